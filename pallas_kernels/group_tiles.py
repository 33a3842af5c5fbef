"""The group-centric tiling shared by the kernels (NSA section 3.4).

Every forward kernel runs on the grid (batch, tile of ``block_q`` query
positions, kv head) and sees the queries of all G heads of that kv head's
group at once: a ``[block_q, Gp, D]`` block of a ``[B, Tp, Hkv, Gp, D]``
array (``triton_compat.group_heads``), flattened in the kernel to
``rows = block_q * Gp`` rows for the tensor cores.
"""

from __future__ import annotations

from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import triton_compat as tc


def group_spec(block_q: int, *block: int) -> pl.BlockSpec:
  """BlockSpec of a [B, Tp, Hkv, *block] array on grid (b, q tile, kv head)."""
  return pl.BlockSpec((None, block_q, None) + block,
                      lambda b, i, g: (b, i, g) + (0,) * len(block))


def kv_spec(num_keys: int, dim: int) -> pl.BlockSpec:
  """BlockSpec of all keys [B, num_keys, Hkv, dim] of one (batch, kv head)."""
  return pl.BlockSpec((None, num_keys, None, dim), lambda b, i, g: (b, 0, g, 0))


def query_tile(q_ref):
  """Loads a [block_q, Gp, Dk] query block as rows.

  Returns:
    (q [rows, Dk], t [rows] int32: the query position of each row).
  """
  block_q, group_p, dk = q_ref.shape
  rows = block_q * group_p
  q = q_ref[...].reshape(rows, dk)
  t = pl.program_id(1) * block_q + lax.div(jnp.arange(rows), group_p)
  return q, t


def group_rows(x, num_kv_heads: int, seq_pad: int, group_p: int):
  """A per-(position, head) statistic in the kernels' grouped layout.

  Args:
    x: [B, T, Hq] (lse, delta), Hq = G * Hkv.

  Returns:
    [B, seq_pad, Hkv, Gp], zero-padded like the grouped queries.
  """
  return tc.group_heads(x[..., None], num_kv_heads, seq_pad, group_p, 1)[..., 0]
