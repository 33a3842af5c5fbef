"""Bytes a sharded NSA layer moves: predicted from shapes, read from HLO.

Both count what one device *receives* per call, by collective kind:
  all-gather          result x (g - 1) / g   (its own shard does not move)
  all-to-all          result x (g - 1) / g
  reduce-scatter      result x (g - 1)       (= input x (g - 1) / g)
  collective-permute  result                 (every target receives it)
  all-reduce          2 x result x (g - 1) / g  (ring: reduce-scatter +
                      all-gather)
for a group of g devices. ``predict`` gives the collectives
``sharded_nsa_attention`` issues; ``hlo_collectives`` reads them from a
compiled program (``jax.jit(f).lower(...).compile().as_text()``), so a
test or the benchmark can hold one against the other.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

from nsa_jax.config import NSAConfig
from nsa_jax.parallel.attention import ContextParallel

KINDS = ("all-gather", "all-to-all", "reduce-scatter", "collective-permute",
         "all-reduce")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
             "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
             "f64": 8}
_OP = re.compile(r"=\s*(?P<type>\([^)]*\)|\S+)\s+(?P<op>all-gather|"
                 r"all-to-all|reduce-scatter|collective-permute|all-reduce)"
                 r"(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program.

  Attributes:
    kind: one of ``KINDS``.
    result_bytes: bytes of its result on one device.
    group: devices per group (1: a no-op).
    from_shard_map: issued inside a ``shard_map`` (rather than inserted by
      the compiler to lay out its inputs and outputs).
  """

  kind: str
  result_bytes: int
  group: int
  from_shard_map: bool

  @property
  def received(self) -> int:
    """Bytes one device receives (module docstring)."""
    g = self.group
    if g <= 1:
      return 0
    return {"all-gather": self.result_bytes * (g - 1) // g,
            "all-to-all": self.result_bytes * (g - 1) // g,
            "reduce-scatter": self.result_bytes * (g - 1),
            "collective-permute": self.result_bytes,
            "all-reduce": 2 * self.result_bytes * (g - 1) // g}[self.kind]


def _array_bytes(text: str) -> list[int]:
  return [_ITEMSIZE[dtype] * math.prod(int(d) for d in dims.split(",") if d)
          for dtype, dims in _ARRAY.findall(text)]


def _group_size(line: str) -> int:
  """Devices per group; a permute counts as a pair (1 without pairs)."""
  if "source_target_pairs=" in line:
    return 2 if re.search(r"source_target_pairs=\{\{", line) else 1
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if groups:
    return len(groups.group(1).split(","))
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
  if iota:
    return int(iota.group(1).split(",")[-1])
  named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if named:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'",
                                                       named.group(2)))
  raise ValueError(f"no replica groups in HLO line: {line[:200]}")


def hlo_collectives(hlo: str) -> list[Collective]:
  """The collectives of an HLO module's text, in order.

  Asynchronous pairs count once (their ``-start``, whose largest array is
  the result).
  """
  found = []
  for line in hlo.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    sizes = _array_bytes(match.group("type"))
    result = max(sizes) if match.group("start") else sum(sizes)
    found.append(Collective(match.group("op"), result, _group_size(line),
                            "shard_map" in line))
  return found


def received_by_kind(collectives, *, shard_map_only: bool = True
                     ) -> dict[str, int]:
  """Bytes received per device, summed by kind (kinds with none left out)."""
  total = collections.Counter()
  for c in collectives:
    if c.received and (c.from_shard_map or not shard_map_only):
      total[c.kind] += c.received
  return dict(total)


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """One NSA layer's call, global shapes.

  Attributes:
    batch, seq_len: B, T.
    num_heads, num_kv_heads, head_dim, v_head_dim: Hq, Hkv, Dk, Dv.
    itemsize: bytes per element of q, k, v, gates (2 for bf16).
    config: the NSA hyper-parameters.
  """

  batch: int
  seq_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  v_head_dim: int
  itemsize: int
  config: NSAConfig


@dataclasses.dataclass(frozen=True)
class Split:
  """How the mesh splits one call: P sequence shards, batch and head
  splits."""

  sequence: int
  batch: int = 1
  heads: int = 1


def predict(shape: LayerShape, split: Split, context: ContextParallel, *,
            backward: bool = False) -> dict[str, dict[str, int]]:
  """Bytes one device receives in one call, per part and collective kind.

  Args:
    shape: the layer's global shapes.
    split: the mesh's splits (``sequence`` > 1).
    context: the strategy ("gather" lists its fallback all-gather as the
      part "fallback K/V": present in the program, run only on overflow).
    backward: also the gradient's collectives (the transposes: reduce-
      scatter for all-gather, the reverse permute, all-to-all).

  Returns:
    part name -> {kind: bytes}; parts are "compressed K/V", "window halo",
    "selected K/V", "requests", "fallback K/V", "q/k/v/gates/out".
  """
  p, c, s = split.sequence, shape.config, shape.itemsize
  b, tl = shape.batch // split.batch, shape.seq_len // p
  hq, hkv = shape.num_heads // split.heads, shape.num_kv_heads // split.heads
  kv_row = hkv * (shape.head_dim + shape.v_head_dim) * s  # one K+V position
  share = lambda n: n * (p - 1) // p  # all-gather / all-to-all of n bytes
  num_cmp = c.num_compressed(shape.seq_len)
  parts = {"compressed K/V": {"all-gather": share(b * -(-num_cmp // p) * p
                                                  * kv_row)}}
  if context.strategy == "heads":
    rows = b * tl * (hq * (shape.head_dim + 3 + shape.v_head_dim) * s
                     + 2 * kv_row)
    parts["q/k/v/gates/out"] = {"all-to-all": share(rows)}
  else:
    halo = min(c.window - 1, (p - 1) * tl)
    parts["window halo"] = {"collective-permute": b * halo * kv_row}
    gathered = {"all-gather": share(b * shape.seq_len * kv_row)}
    if context.strategy == "allgather":
      parts["selected K/V"] = gathered
    else:
      blocks = shape.seq_len // c.sel_block
      parts["selected K/V"] = {"all-to-all": share(
          p * b * context.capacity * c.sel_block * kv_row)}
      parts["requests"] = {"all-gather": share(p * b * hkv * blocks),
                           "all-reduce": 2 * 4 * (p - 1) // p}
      parts["fallback K/V"] = gathered
  if backward:
    transpose = {"all-gather": "reduce-scatter", "all-to-all": "all-to-all",
                 "collective-permute": "collective-permute"}
    for name, kinds in parts.items():
      if name != "requests":
        for kind, n in list(kinds.items()):
          kinds[transpose[kind]] = kinds.get(transpose[kind], 0) + n
  return parts


def total_by_kind(parts: dict[str, dict[str, int]], *,
                  skip: tuple[str, ...] = ()) -> dict[str, int]:
  """Sum of ``predict``'s parts by kind, leaving out the parts in ``skip``."""
  total = collections.Counter()
  for name, kinds in parts.items():
    if name not in skip:
      total.update(kinds)
  return {k: v for k, v in total.items() if v}
