"""Launch settings per kernel and shape: validated configs and a small table.

Every entry was measured on one H100 (bf16, T = 64k) by
``python experiments/bench_kernels.py --tune``, which times forward+backward
for each candidate of ``nsa_jax.benchmark.TUNE_CANDIDATES`` (rows x keys x
warps x stages). The winners, against the runners-up:

- compressed, 64 bucket (Hq 8 / Hkv 2 / D 64): (128, 64, 4, 3) 4.01 ms;
  (64, 64, 4, 2) 4.41 ms, block_k 32 9-16 ms, 8 warps 4.4-7.8 ms.
- compressed, 128 bucket (Hq 64 / Hkv 4 / D 128): (64, 64, 4, 2) 51.7 ms
  over rows {64, 128} x keys {32, 64} x warps {4, 8}; (128, 64, 4, 2) had a
  faster forward (11.9 against 13.2 ms) but a slower backward, which shares
  the launch.
- compressed, 256 bucket (Hq 64 / Hkv 4 / Dk 192 / Dv 128): (128, 64, 8, 2)
  82 ms; (64, 64, 4, 2) 110 ms, (64, 32, 8, 2) (the earlier, unmeasured
  entry) 321 ms; 3 stages at 128 rows overflow shared memory.
- selected, 64 bucket: (16, 64, 4, 3) 10.9 ms; 2 stages 11.3 ms, 32 or 64
  rows 14-17 ms, 8 warps 16-33 ms.
- selected, 128 bucket: at Hq 64 / Hkv 4, 16 rows with 4 warps 56.1-56.5 ms
  (2 or 3 stages), 32 or 64 rows 62-68 ms, 8 warps 70-116 ms; at Hq 32 /
  Hkv 8 (16 rows = 4 positions), 4 warps 69.3-70.7 ms, 32 rows 88 ms, 64
  rows 92 ms, 2 warps 427-585 ms.
- selected, 256 bucket: (16, 64, 4, 2) 93 ms; 8 warps 110-116 ms, 32 or
  64 rows 102-160 ms.

Float32 inputs get smaller tiles (``get_config``). The block-score kernel
has its own measured default (``block_scores.default_launch``).

Each kernel has one frozen config class whose fields say what they count, and
``resolve`` is the one place that turns the table plus a caller's overrides
into a config checked for the problem's GQA group.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import triton_compat as tc


def _check_power_of_two(**values):
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (
        value & (value - 1)):
      raise ValueError(f"{name}={value!r} must be a power of two")


def _check_rows(name: str, positions: int, group: int):
  """A tile of ``positions`` query positions holds positions * Gp rows."""
  rows = positions * tc.next_pow2(group)
  if rows < tc.MIN_DOT_DIM:
    raise ValueError(f"{name}={positions} gives {rows} query rows for "
                     f"G={group}; plgpu.dot needs >= {tc.MIN_DOT_DIM}")


def _check_warps_and_stages(num_warps, num_stages):
  _check_power_of_two(num_warps=num_warps)
  if isinstance(num_stages, bool) or not isinstance(num_stages, int) or (
      num_stages < 1):
    raise ValueError(f"num_stages={num_stages!r} must be an int >= 1")


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
  """One launch of the compressed-attention or block-score kernel.

  Attributes:
    block_q: query positions per program. A program holds
      ``block_q * next_pow2(G)`` query rows: all heads of the GQA group.
    block_k: compressed tokens (keys) per inner-loop step; >= 16.
    num_warps: Triton warps per program (a power of two).
    num_stages: Triton software-pipelining stages (>= 1).
    fwd_block_q: query positions per forward program of the compressed
      kernel where it differs from the backward's ``block_q``; None: the
      same (``forward_block_q``).
  """

  block_q: int
  block_k: int
  num_warps: int
  num_stages: int
  fwd_block_q: int | None = None

  def __post_init__(self):
    _check_warps_and_stages(self.num_warps, self.num_stages)
    _check_power_of_two(block_q=self.block_q, block_k=self.block_k)
    if self.fwd_block_q is not None:
      _check_power_of_two(fwd_block_q=self.fwd_block_q)
    if self.block_k < tc.MIN_DOT_DIM:
      raise ValueError(f"block_k={self.block_k} keys per step; plgpu.dot "
                       f"needs >= {tc.MIN_DOT_DIM}")

  @property
  def forward_block_q(self) -> int:
    """Query positions per forward program."""
    return self.block_q if self.fwd_block_q is None else self.fwd_block_q

  def check_group(self, group: int) -> None:
    """Raises ValueError unless every tile has >= 16 rows for group G."""
    _check_rows("block_q", self.block_q, group)
    _check_rows("fwd_block_q", self.forward_block_q, group)


@dataclasses.dataclass(frozen=True)
class SelectedLaunchConfig:
  """One launch of the selected-attention kernel (and of the window).

  Its key tile is one selection block (l' keys, fixed by the call), so the
  launch sets query tiles only.

  Attributes:
    block_q: query positions per forward / dQ program (``block_q * Gp``
      rows).
    block_q_dkv: query positions the dK/dV program gathers per step
      (``block_q_dkv * Gp`` rows).
    num_warps: Triton warps per program (a power of two).
    num_stages: Triton software-pipelining stages (>= 1).
  """

  block_q: int
  block_q_dkv: int
  num_warps: int
  num_stages: int

  def __post_init__(self):
    _check_warps_and_stages(self.num_warps, self.num_stages)
    _check_power_of_two(block_q=self.block_q, block_q_dkv=self.block_q_dkv)

  def check_group(self, group: int) -> None:
    """Raises ValueError unless every tile has >= 16 rows for group G."""
    _check_rows("block_q", self.block_q, group)
    _check_rows("block_q_dkv", self.block_q_dkv, group)


KERNELS = ("compressed", "selected")
_CONFIG_CLASS = {"compressed": LaunchConfig, "selected": SelectedLaunchConfig}

# Head-dim buckets (padded max(Dk, Dv)) -> (query rows per program, second
# tile in rows or keys, num_warps, num_stages); the module docstring has the
# measurements behind each entry.
_TABLE = {
    # second column: compressed tokens per step.
    "compressed": {64: (128, 64, 4, 3), 128: (64, 64, 4, 2),
                   256: (128, 64, 8, 2)},
    # NSA section 3.4: one query position per program once the group fills
    # the 16 rows of a tensor-core tile; smaller groups tile positions. The
    # second column is in rows too: the dK/dV kernel's gathered rows.
    "selected": {64: (16, 64, 4, 3), 128: (16, 64, 4, 2),
                 256: (16, 64, 4, 2)},
}

# Forward query rows where they beat the bucket's shared entry (2-byte
# inputs; the forward alone at 64k, block_k 64, 4 warps, 2 stages, as
# ``bench_kernels.py --tune --tune-kernels compressed_fwd`` times it):
# compressed, 128 bucket, 128 rows 11.9 against 13.2 ms at Hq 64 / Hkv 4
# and 6.9 against 7.3 ms at Hq 32 / Hkv 8.
_FWD_ROWS = {"compressed": {128: 128}}

# The selected kernel's dK/dV step splits each key block's list of query
# positions into segments of S positions, one program each (see
# ``selected_segment``). PROVISIONAL, NOT MEASURED: the smallest S, and the
# most segments per block (the partial dK/dV buffer is that many float32
# copies of dK/dV).
SELECTED_MIN_SEGMENT = 256
SELECTED_MAX_SEGMENTS = 8

# The selected kernel's block-major passes (``selected_attention(
# fwd_from_blocks=..., dq_from_blocks=...)``): for groups up to this size
# (the query-tile kernels' tiles then mix positions that chose different
# blocks, and every row of a tile computes every block of its union), with
# the per-(query, slot) buffer of one launch within this many bytes.
# Measured on an H100 (bf16, n = 16, l' = 64, block tables of random
# inputs, experiments/bench_selected_passes.py). dQ from the dK/dV pass,
# selected forward+backward, dQ kernel -> dQ from blocks: Hq 8 / Hkv 2 /
# D 64 at B 4 x 16k 8.85 -> 6.23 ms, B 1 x 64k 10.58 -> 7.48 ms; Hq 32 /
# Hkv 8 / D 128 at 16k 15.1 -> 11.7 ms (a 2 GiB buffer); Hq 64 / Hkv 4 /
# D 128 at 16k 13.7 -> 13.0 ms, too little for its 4.3 GB buffer. The
# block-major forward, query tiles -> blocks: 3.61 -> 2.28 ms, 4.07 ->
# 3.32 ms, 6.16 -> 3.91 ms; at G = 16 4.52 -> 6.69 ms (slower: one-position
# tiles mask nothing). So G = 16 keeps both query-tile kernels. The byte
# cap bounds the memory a pass holds: a larger buffer runs in query chunks
# within it (``selected_chunks``; the cap is just above the largest buffer
# measured in one piece, 2.2 GB). Hq 32 / Hkv 8 / D 128 at 64k, 4 chunks
# a pass: forward 29.0 -> 16.6 ms, forward+backward 70.9 -> 45.5 ms (38.4
# with the dQ pass in one 8.6 GB piece).
SELECTED_BLOCK_MAJOR_MAX_GROUP = 8
SELECTED_PARTS_MAX_BYTES = 5 * 2 ** 29


def selected_parts_bytes(*, slots: int, dim: int, itemsize: int,
                         forward: bool) -> int:
  """Size of a block-major pass's per-(query, slot) buffer.

  Args:
    slots: B * T * Hq * n.
    dim: the padded head dim of the rows stored (Dk_p for dQ shares, Dv_p
      for forward partials).
    itemsize: bytes of q's dtype, in which the rows are stored.
    forward: forward partials also store a float32 max and sum a row.
  """
  return slots * (dim * itemsize + (8 if forward else 0))


def selected_block_major(group: int) -> bool:
  """Whether the selected kernel's passes run block-major at G = ``group``
  (at any length: ``selected_chunks`` keeps each launch's buffer within
  ``SELECTED_PARTS_MAX_BYTES``)."""
  return group <= SELECTED_BLOCK_MAJOR_MAX_GROUP


def selected_chunks(parts_bytes: int) -> int:
  """Query chunks of a block-major pass: its buffer (forward partials or
  dQ shares), split by query position, stays within
  ``SELECTED_PARTS_MAX_BYTES`` a chunk."""
  return max(1, -(-parts_bytes // SELECTED_PARTS_MAX_BYTES))


def _bucket(head_dim: int) -> int:
  for bucket in (64, 128):
    if head_dim <= bucket:
      return bucket
  return 256


def table_entries(kernel: str):
  """The raw (rows, second tile, num_warps, num_stages) entries of a kernel."""
  return sorted(set(_TABLE[kernel].values()))


def make_config(entry, *, group: int, seq_len: int, num_keys: int = 0,
                block_k_in_rows: bool = False, fwd_rows: int | None = None):
  """Turns a table entry into a launch config fitted to one problem.

  Args:
    entry: (rows, second tile, num_warps, num_stages) from the table.
    group: G, query heads per kv head.
    seq_len: T, query positions.
    num_keys: keys the inner loop walks (Tc for branch 1).
    block_k_in_rows: the entry is the selected kernel's, whose second tile
      counts dK/dV query rows; gives a ``SelectedLaunchConfig``.
    fwd_rows: query rows of the compressed kernel's forward, if not the
      entry's.

  Returns:
    A ``LaunchConfig`` (or ``SelectedLaunchConfig``) whose tiles are powers
    of two with at least 16 rows and 16 keys (the minimum of ``plgpu.dot``),
    and no larger than the problem needs.
  """
  rows, second, num_warps, num_stages = entry
  group_p = tc.next_pow2(group)
  min_q = max(1, tc.MIN_DOT_DIM // group_p)
  fit = lambda r: max(min_q, min(r // group_p, tc.next_pow2(seq_len)))
  if block_k_in_rows:
    return SelectedLaunchConfig(block_q=fit(rows), block_q_dkv=fit(second),
                                num_warps=num_warps, num_stages=num_stages)
  block_k = max(tc.MIN_DOT_DIM, min(second, tc.next_pow2(num_keys)))
  return LaunchConfig(block_q=fit(rows), block_k=block_k,
                      num_warps=num_warps, num_stages=num_stages,
                      fwd_block_q=None if fwd_rows is None else fit(fwd_rows))


def get_config(kernel: str, *, group: int, head_dim: int, seq_len: int,
               num_keys: int = 0, itemsize: int = 2):
  """The table's launch configuration for ``kernel`` on one problem shape.

  The table is sized for 2-byte inputs. Float32 tiles hold twice the bytes:
  in the 256 bucket they overflow the H100's 227 KiB of shared memory per
  block (seen: 254,464 bytes asked for Dk 192 / Dv 128), so they get half
  the rows and keys and no software pipelining; elsewhere at most 2 stages.
  """
  entry = _TABLE[kernel][_bucket(head_dim)]
  rows, second, num_warps, num_stages = entry
  if itemsize >= 4 and _bucket(head_dim) == 256:
    entry = (max(tc.MIN_DOT_DIM, rows // 2), max(tc.MIN_DOT_DIM, second // 2),
             num_warps, 1)
  elif itemsize >= 4:
    entry = (rows, second, num_warps, min(num_stages, 2))
  fwd_rows = None
  if itemsize < 4:  # float32's wider tiles keep the shared entry
    fwd_rows = _FWD_ROWS.get(kernel, {}).get(_bucket(head_dim))
  return make_config(entry, group=group, seq_len=seq_len, num_keys=num_keys,
                     block_k_in_rows=kernel == "selected", fwd_rows=fwd_rows)


def resolve(kernel: str, *, group: int, head_dim: int, seq_len: int,
            num_keys: int = 0, itemsize: int = 2, **overrides):
  """The launch of one kernel call: the table's, then the caller's overrides.

  Args:
    kernel: one of ``KERNELS``.
    group: G, query heads per kv head.
    head_dim: padded max(Dk, Dv), picks the table bucket.
    seq_len: T.
    num_keys: keys of the inner loop (Tc for the compressed kernels).
    itemsize: bytes per input element (float32 gets smaller tiles).
    **overrides: config fields (``block_q``, ``block_k`` or
      ``block_q_dkv``, ``num_warps``, ``num_stages``); None keeps the table's.

  Returns:
    The kernel's config class, validated (``__post_init__``) and checked
    for G (``check_group``).

  Raises:
    ValueError: an override that is not a field of the kernel's config, or a
      launch the Triton lowering cannot take.
  """
  launch = get_config(kernel, group=group, head_dim=head_dim,
                      seq_len=seq_len, num_keys=num_keys, itemsize=itemsize)
  fields = {f.name for f in dataclasses.fields(_CONFIG_CLASS[kernel])}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"{unknown} are not launch settings of the {kernel} "
                     f"kernel; those are {sorted(fields)}")
  given = {name: value for name, value in overrides.items()
           if value is not None}
  if "block_q" in given and "fwd_block_q" in fields:
    # A caller's block_q sets the forward's too unless it sets that.
    given.setdefault("fwd_block_q", None)
  launch = dataclasses.replace(launch, **given)
  launch.check_group(group)
  return launch


def validate(launch, group: int, *, block_k_in_rows: bool = False):
  """Raises ValueError unless ``launch`` fits group G (see ``check_group``).

  Construction already checks powers of two; kept for kernels that build
  their config by hand. ``block_k_in_rows`` is accepted for old callers.
  """
  del block_k_in_rows  # the config's class knows what its tiles count
  launch.check_group(group)


def selected_segment(seq_len: int, block_q_dkv: int,
                     num_keys: int | None = None) -> int:
  """S, query positions per program of the selected kernel's dK/dV step.

  A block is selected by at most T positions, so ``ceil(T / S)`` segments
  cover its list; S is the smallest power of two >= ``SELECTED_MIN_SEGMENT``
  and ``block_q_dkv`` that keeps them <= ``SELECTED_MAX_SEGMENTS``. Each
  segment writes a float32 partial of all Tk keys; with more keys than
  queries (a sequence shard's queries against all keys, context
  parallelism) the count is cut so the partials hold no more than
  ``SELECTED_MAX_SEGMENTS * T`` key rows, as for Tk = T (at least one
  segment: then the longest program walks every position).

  Args:
    seq_len: T, query positions.
    block_q_dkv: positions per gather step (S is a whole number of steps).
    num_keys: Tk, keys; None: T.

  Returns:
    S = max(MIN_SEGMENT, block_q_dkv, next_pow2(ceil(T / segments))),
    segments = max(1, MAX_SEGMENTS * T // max(T, Tk)).
  """
  num_keys = seq_len if num_keys is None else num_keys
  segments = max(1, SELECTED_MAX_SEGMENTS * seq_len // max(seq_len, num_keys,
                                                           1))
  return max(SELECTED_MIN_SEGMENT, block_q_dkv,
             tc.next_pow2(-(-seq_len // segments)))
