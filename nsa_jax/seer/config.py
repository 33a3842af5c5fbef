"""SeerAttention-R settings: the gate and the decode-time block choice."""

from __future__ import annotations

import dataclasses

QUERY_MERGES = ("linear", "mean")


def _check_int(owner: str, name: str, value, minimum: int = 1):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got "
                     f"{value!r}")


@dataclasses.dataclass(frozen=True)
class SeerConfig:
  """Hyper-parameters of an AttnGate (SeerAttention-R, arXiv 2506.08889).

  Attributes:
    block_size: b, keys per block (the paper's 64). The gate scores blocks
      of b keys; decoding reads whole blocks.
    gate_dim: d_gate, width of the gate's queries and keys (even: RoPE).
    query_merge: "linear" (the paper's: one linear map of the group's g
      query heads, weight [Hkv, g, D, d_gate]) or "mean" (average the
      group's heads, then a per-kv-head linear [Hkv, D, d_gate]; an
      ablation).
    qk_norm: RMSNorm over d_gate on the gate's queries and keys.
    rope: RoPE on the gate's queries (at the token's position) and keys
      (at the block's first position).
  """

  block_size: int = 64
  gate_dim: int = 128
  query_merge: str = "linear"
  qk_norm: bool = False
  rope: bool = True

  def __post_init__(self):
    _check_int("SeerConfig", "block_size", self.block_size)
    _check_int("SeerConfig", "gate_dim", self.gate_dim, 2)
    if self.rope and self.gate_dim % 2:
      raise ValueError(f"SeerConfig.gate_dim={self.gate_dim} must be even "
                       "with rope=True")
    if self.query_merge not in QUERY_MERGES:
      raise ValueError(f"SeerConfig.query_merge={self.query_merge!r} is not "
                       f"one of {QUERY_MERGES}")
    flags = {"qk_norm": self.qk_norm, "rope": self.rope}
    wrong = {k: v for k, v in flags.items() if not isinstance(v, bool)}
    if wrong:
      raise ValueError(f"SeerConfig fields {wrong} must be bools")


@dataclasses.dataclass(frozen=True)
class Selection:
  """Which blocks a decoding query reads: a token budget or a threshold.

  Block 0 and the query's own (open) block are always read and count
  against the budget. Exactly one of ``budget`` and ``threshold`` is set.

  Attributes:
    budget: tokens a query may read: ``budget // b`` blocks, the forced two
      plus the gate's top ``budget // b - 2``; every causal block when
      there are no more than that.
    threshold: read every block whose gate probability is >= this.
    max_blocks: with ``threshold``, at most this many blocks (the forced
      two included, then the highest scores); None: no limit. The table the
      decode kernel walks has this many slots, so it also bounds the work.
  """

  budget: int | None = None
  threshold: float | None = None
  max_blocks: int | None = None

  def __post_init__(self):
    if (self.budget is None) == (self.threshold is None):
      raise ValueError("Selection takes exactly one of budget and threshold, "
                       f"got budget={self.budget!r}, "
                       f"threshold={self.threshold!r}")
    if self.budget is not None:
      _check_int("Selection", "budget", self.budget)
      if self.max_blocks is not None:
        raise ValueError("Selection.max_blocks goes with threshold, not "
                         "budget")
    else:
      t = self.threshold
      if isinstance(t, bool) or not isinstance(t, (int, float)) or not (
          0.0 <= t <= 1.0):
        raise ValueError(f"Selection.threshold must be in [0, 1], got {t!r}")
      if self.max_blocks is not None:
        _check_int("Selection", "max_blocks", self.max_blocks, 2)

  def num_slots(self, block_size: int, num_blocks: int) -> int:
    """Blocks in each row of the block table.

    Args:
      block_size: b.
      num_blocks: blocks the keys split into (the cache's, or ceil(T / b)).

    Raises:
      ValueError: a budget smaller than two blocks.
    """
    if self.budget is None:
      return min(self.max_blocks or num_blocks, num_blocks)
    slots = self.budget // block_size
    if slots < 2:
      raise ValueError(
          f"Selection.budget={self.budget} tokens is {slots} block(s) of "
          f"{block_size}; it must hold at least 2 (block 0 and the query's "
          "own block are always read)")
    return min(slots, num_blocks)

  def __str__(self):
    if self.budget is not None:
      return f"budget {self.budget}"
    cap = f", at most {self.max_blocks} blocks" if self.max_blocks else ""
    return f"threshold {self.threshold}{cap}"
