"""Tile sizes, num_warps and num_stages per kernel and shape: a small table.

PROVISIONAL VALUES. No GPU was available when this table was written: the
numbers below are NOT measured. They follow the usual FlashAttention-2 Triton
choices (64-row query tiles, 4 warps up to head dim 128, 8 above) and must be
re-measured on an H100 with ``python experiments/bench_kernels.py --tune``,
which times every candidate in ``CANDIDATES`` and prints the best per bucket.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import triton_compat as tc


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
  """One launch of an NSA kernel.

  Attributes:
    block_q: query positions per program. A program holds
      ``block_q * next_pow2(G)`` query rows: all heads of the GQA group.
    block_k: keys (compressed tokens) per inner-loop step of branch 1 and of
      the block scores. The selected kernel's key tile is one selection
      block; there ``block_k`` is the number of query positions its dK/dV
      kernel gathers per step (``block_k * next_pow2(G)`` rows).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
  """

  block_q: int
  block_k: int
  num_warps: int
  num_stages: int


KERNELS = ("compressed", "selected", "block_scores")

# Head-dim buckets (padded max(Dk, Dv)) -> (query rows per program, block_k,
# num_warps, num_stages). PROVISIONAL, NOT MEASURED: see the module docstring.
_TABLE = {
    "compressed": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2),
                   256: (64, 32, 8, 2)},
    # NSA section 3.4: one query position per program once the group fills
    # the 16 rows of a tensor-core tile; smaller groups tile positions. The
    # second column is in rows here too: the dK/dV kernel's gathered rows.
    "selected": {64: (16, 64, 4, 2), 128: (16, 64, 4, 2),
                 256: (16, 64, 8, 2)},
    "block_scores": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2),
                     256: (64, 32, 8, 2)},
}

# The selected kernel's dK/dV step splits each key block's list of query
# positions into segments of S positions, one program each (see
# ``selected_segment``). PROVISIONAL, NOT MEASURED: the smallest S, and the
# most segments per block (the partial dK/dV buffer is that many float32
# copies of dK/dV).
SELECTED_MIN_SEGMENT = 256
SELECTED_MAX_SEGMENTS = 8

# What ``bench_kernels.py --tune`` tries per bucket.
CANDIDATES = {
    kernel: [(rows, block_k, warps, stages)
             for rows in (16, 32, 64, 128)
             for block_k in (32, 64, 128)
             for warps in (4, 8) for stages in (1, 2, 3)]
    for kernel in KERNELS
}


def _bucket(head_dim: int) -> int:
  for bucket in (64, 128):
    if head_dim <= bucket:
      return bucket
  return 256


def table_entries(kernel: str):
  """The raw (rows, block_k, num_warps, num_stages) entries of ``kernel``."""
  return sorted(set(_TABLE[kernel].values()))


def make_config(entry, *, group: int, seq_len: int, num_keys: int = 0,
                block_k_in_rows: bool = False) -> LaunchConfig:
  """Turns a table entry into a ``LaunchConfig`` fitted to one problem.

  Args:
    entry: (rows, block_k, num_warps, num_stages) from the table.
    group: G, query heads per kv head.
    seq_len: T, query positions.
    num_keys: keys the inner loop walks (Tc for branch 1).
    block_k_in_rows: the entry's block_k counts query rows (the selected
      kernel's dK/dV step), converted here to positions.

  Returns:
    A ``LaunchConfig`` whose tiles are powers of two, with at least 16 query
    rows and 16 keys per tile (the minimum of ``plgpu.dot``), and no larger
    than the problem needs.
  """
  rows, block_k, num_warps, num_stages = entry
  group_p = tc.next_pow2(group)
  min_q = max(1, tc.MIN_DOT_DIM // group_p)
  block_q = max(min_q, min(rows // group_p, tc.next_pow2(seq_len)))
  if block_k_in_rows:
    block_k = max(min_q, min(block_k // group_p, tc.next_pow2(seq_len)))
  else:
    block_k = max(tc.MIN_DOT_DIM, min(block_k, tc.next_pow2(num_keys)))
  return LaunchConfig(block_q, block_k, num_warps, num_stages)


def get_config(kernel: str, *, group: int, head_dim: int, seq_len: int,
               num_keys: int = 0, itemsize: int = 2) -> LaunchConfig:
  """The table's launch configuration for ``kernel`` on one problem shape.

  The table is sized for 2-byte inputs. Float32 tiles hold twice the bytes:
  in the 256 bucket they overflow the H100's 227 KiB of shared memory per
  block (seen: 254,464 bytes asked for Dk 192 / Dv 128), so they get half
  the rows and keys and no software pipelining.
  """
  entry = _TABLE[kernel][_bucket(head_dim)]
  if itemsize >= 4 and _bucket(head_dim) == 256:
    rows, block_k, num_warps, _ = entry
    entry = (max(tc.MIN_DOT_DIM, rows // 2), max(tc.MIN_DOT_DIM, block_k // 2),
             num_warps, 1)
  return make_config(entry, group=group, seq_len=seq_len, num_keys=num_keys,
                     block_k_in_rows=kernel == "selected")


def selected_segment(seq_len: int, block_k: int) -> int:
  """S, query positions per program of the selected kernel's dK/dV step.

  A block is selected by at most T positions, so ``ceil(T / S)`` segments
  cover its list; S is the smallest power of two >= ``SELECTED_MIN_SEGMENT``
  and ``block_k`` that keeps them <= ``SELECTED_MAX_SEGMENTS``.

  Args:
    seq_len: T, query positions.
    block_k: positions per gather step (S is a whole number of steps).

  Returns:
    S = max(MIN_SEGMENT, block_k, next_pow2(ceil(T / MAX_SEGMENTS))).
  """
  return max(SELECTED_MIN_SEGMENT, block_k,
             tc.next_pow2(-(-seq_len // SELECTED_MAX_SEGMENTS)))


def validate(launch: LaunchConfig, group: int, *,
             block_k_in_rows: bool = False):
  """Raises ValueError unless ``launch`` gives power-of-two, >= 16 tiles."""
  group_p = tc.next_pow2(group)
  for name, value in (("block_q", launch.block_q),
                      ("block_k", launch.block_k)):
    if value < 1 or value & (value - 1):
      raise ValueError(f"{name}={value} must be a power of two")
  if launch.block_q * group_p < tc.MIN_DOT_DIM:
    raise ValueError(f"block_q={launch.block_q} gives "
                     f"{launch.block_q * group_p} query rows for G={group}; "
                     f"plgpu.dot needs >= {tc.MIN_DOT_DIM}")
  block_k_rows = launch.block_k * (group_p if block_k_in_rows else 1)
  if block_k_rows < tc.MIN_DOT_DIM:
    raise ValueError(f"block_k={launch.block_k} gives a {block_k_rows}-wide "
                     f"tile for G={group}; plgpu.dot needs >= "
                     f"{tc.MIN_DOT_DIM}")
