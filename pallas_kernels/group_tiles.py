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
  t = pl.program_id(1) * block_q + lax.div(
      jnp.arange(rows, dtype=jnp.int32), jnp.int32(group_p))
  return q, t


def group_rows(x, num_kv_heads: int, seq_pad: int, group_p: int):
  """A per-(position, head) statistic in the kernels' grouped layout.

  Args:
    x: [B, T, Hq] (lse, delta), Hq = G * Hkv.

  Returns:
    [B, seq_pad, Hkv, Gp], zero-padded like the grouped queries.
  """
  return tc.group_heads(x[..., None], num_kv_heads, seq_pad, group_p, 1)[..., 0]


def delta_rows(out, d_out, q5, dv_p: int, d_lse=None, lse=None):
  """dO and delta = rowsum(dO * O) in the grouped layout (FA-2 backward).

  A cotangent ``d_lse`` on a returned lse adds d_lse * P to dS, so it enters
  delta as ``-d_lse`` (where ``lse`` is finite). A row whose output is not
  finite (it saw a non-finite key or value, and the forward set it to NaN
  on purpose) gets no gradient: its dO is zeroed, as differentiating the
  other paths' ``where(sees_bad, nan, out)`` gives.

  Args:
    out, d_out: [B, T, Hq, Dv] forward output and its cotangent.
    q5: the grouped queries [B, Tp, Hkv, Gp, Dk] (gives the layout).
    dv_p: padded Dv.
    d_lse: optional [B, T, Hq] cotangent of lse.
    lse: [B, T, Hq] float32 forward log-sum-exp, needed with ``d_lse``.

  Returns:
    (dO [B, Tp, Hkv, Gp, dv_p], delta float32 [B, Tp, Hkv, Gp]).
  """
  _, seq_pad, hkv, group_p, _ = q5.shape
  finite = jnp.all(jnp.isfinite(out), axis=-1, keepdims=True)
  d_out = jnp.where(finite, d_out, jnp.zeros((), d_out.dtype))
  out = jnp.where(finite, out, jnp.zeros((), out.dtype))
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
  if d_lse is not None:
    delta = delta - jnp.where(jnp.isfinite(lse), d_lse, 0.0)
  return (tc.group_heads(d_out, hkv, seq_pad, group_p, dv_p),
          group_rows(delta, hkv, seq_pad, group_p))
