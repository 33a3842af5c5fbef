"""NSAConfig: the hyper-parameters of Native Sparse Attention, validated."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NSAConfig:
  """Hyper-parameters of NSA (paper defaults); hashable, so a jit static.

  Attributes:
    cmp_block: l, raw tokens summarised by one compressed token.
    cmp_stride: d, distance between the starts of consecutive compressed blocks.
    sel_block: l', raw tokens in one selection block.
    num_selected: n, selection blocks per (query, kv head), forced included.
    num_initial: the first blocks, always selected.
    num_local: the query's own block and those just before it, always
      selected.
    window: w, keys ``t - w < s <= t`` seen by the sliding-window branch.
  """

  cmp_block: int = 32
  cmp_stride: int = 16
  sel_block: int = 64
  num_selected: int = 16
  num_initial: int = 1
  num_local: int = 2
  window: int = 512

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"NSAConfig.{field.name} must be an int, got {value!r}")
    for name in ("cmp_block", "cmp_stride", "sel_block", "num_selected",
                 "window"):
      if getattr(self, name) < 1:
        raise ValueError(
            f"NSAConfig.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("num_initial", "num_local"):
      if getattr(self, name) < 0:
        raise ValueError(
            f"NSAConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.cmp_block % self.cmp_stride:
      raise ValueError(
          f"NSAConfig.cmp_block={self.cmp_block} must be a multiple of "
          f"cmp_stride={self.cmp_stride}")
    if self.sel_block % self.cmp_stride:
      raise ValueError(
          f"NSAConfig.cmp_stride={self.cmp_stride} must divide "
          f"sel_block={self.sel_block}")
    if self.sel_block < self.cmp_block:
      raise ValueError(
          f"NSAConfig.sel_block={self.sel_block} must be >= "
          f"cmp_block={self.cmp_block}")
    if self.num_selected < self.num_initial + self.num_local:
      raise ValueError(
          f"NSAConfig.num_selected={self.num_selected} must be >= "
          f"num_initial + num_local = {self.num_initial + self.num_local}")

  @classmethod
  def paper(cls) -> NSAConfig:
    """The paper's settings: l=32, d=16, l'=64, n=16 (1+2 forced), w=512."""
    return cls()

  @classmethod
  def tiny(cls) -> NSAConfig:
    """Small blocks for tests and CPU demos: l=8, d=4, l'=16, n=4, w=32."""
    return cls(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=4,
               num_initial=1, num_local=2, window=32)

  def num_compressed(self, seq_len: int) -> int:
    """Tc = max(0, (T - l) // d + 1) compressed tokens for ``seq_len``."""
    if seq_len < self.cmp_block:
      return 0
    return (seq_len - self.cmp_block) // self.cmp_stride + 1

  def num_selection_blocks(self, seq_len: int) -> int:
    """Ts = ceil(T / l'), selection blocks for ``seq_len`` raw tokens."""
    return -(-seq_len // self.sel_block)
