"""Every version-sensitive Pallas Triton call, plus padding helpers.

The Triton backend of Pallas is deprecated since jax 0.11 (in favour of Mosaic
GPU or jax-triton) but still ships in 0.10.2 .. 0.12. Kernel files import
``pallas_call`` machinery (``pl.BlockSpec``, ``pl.ds``) directly, and everything
that is Triton-specific from here, so a later port replaces this module and the
kernel bodies only.
"""

from __future__ import annotations

import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# plgpu.dot (tl.dot) needs every matmul dimension >= 16.
MIN_DOT_DIM = 16


def compiler_params(num_warps: int, num_stages: int):
  """Triton compiler params; always passed (jax 0.10 would pick Mosaic GPU).

  Args:
    num_warps: warps per program (4 or 8 for these kernels).
    num_stages: software-pipelining depth of the kernel's loops.

  Returns:
    A ``CompilerParams`` for ``pl.pallas_call(compiler_params=...)``.
  """
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
  """2-D matmul with float32 accumulation, full fp32 precision for fp32 inputs.

  The Triton default for fp32 operands is TF32; the NSA kernels are tested for
  fp32 parity with the reference, so fp32 asks for IEEE precision.

  Args:
    a: [M, K] (or [K, M] with ``trans_a``).
    b: [K, N] (or [N, K] with ``trans_b``).
    trans_a: contract over a's first axis.
    trans_b: contract over b's last axis.

  Returns:
    float32 [M, N].
  """
  precision = None
  if a.dtype == jnp.float32 and b.dtype == jnp.float32:
    precision = lax.Precision.HIGHEST
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b,
                   precision=precision)


def default_interpret() -> bool:
  """True when no GPU backend is present: kernels then run in interpret mode."""
  return jax.default_backend() != "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
  return default_interpret() if interpret is None else bool(interpret)


def next_pow2(n: int, minimum: int = 1) -> int:
  """Smallest power of two >= max(n, minimum)."""
  n = max(int(n), minimum, 1)
  return 1 << (n - 1).bit_length()


def dot_parts(dim: int) -> tuple[tuple[int, int], ...]:
  """(first column, width) parts of a head dim for the dots that contract it.

  One part of the padded width (``next_pow2(dim, MIN_DOT_DIM)``), or for a
  dim of three quarters of it (Dk 192 of 256) two: the first half and the
  next quarter, both powers of two, so the padding's zero columns are never
  multiplied (a quarter fewer multiply-adds in q . k).
  """
  full = next_pow2(dim, MIN_DOT_DIM)
  if dim == 3 * full // 4 and full // 4 >= MIN_DOT_DIM:
    return ((0, full // 2), (full // 2, full // 4))
  return ((0, full),)


def dot_t_over_parts(a_parts, b_ref, rows, parts):
  """``a . b[rows]^T`` contracted over column parts of a head dim.

  Args:
    a_parts: one [M, width] array per part (``dot_parts``'s order).
    b_ref: a ref [N, D_p] whose rows ``rows`` (a ``pl.ds``) are read, each
      part's columns only.
    rows: the ``pl.ds`` of b's rows.
    parts: ``dot_parts`` of the head dim.

  Returns:
    float32 [M, rows]: the columns of the padding are never multiplied.
  """
  return sum(dot(a, b_ref[rows, pl.ds(first, width)], trans_b=True)
             for a, (first, width) in zip(a_parts, parts))


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Pads ``x`` at the end of ``axis`` to ``size`` (no copy if it is there)."""
  extra = size - x.shape[axis]
  if extra < 0:
    raise ValueError(f"cannot pad axis {axis} of {x.shape=} down to {size}")
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def group_heads(x: jax.Array, num_kv_heads: int, seq_len: int, group: int,
                head_dim: int) -> jax.Array:
  """[B, T, Hq, D] -> [B, seq_len, Hkv, group, head_dim], zero-padded.

  Query head h = g * G + j becomes (g, j): the G heads of kv head g are one
  tile axis, so a kernel program loads the whole GQA group at once (NSA
  section 3.4, "group-centric data loading").
  """
  b, t, hq, d = x.shape
  x = x.reshape(b, t, num_kv_heads, hq // num_kv_heads, d)
  x = pad_axis(x, 1, seq_len)
  x = pad_axis(x, 3, group)
  return pad_axis(x, 4, head_dim)


def ungroup_heads(x: jax.Array, seq_len: int, num_heads_per_group: int,
                  head_dim: int | None = None) -> jax.Array:
  """Inverse of ``group_heads``: [B, Tp, Hkv, Gp, (Dp)] -> [B, T, Hq, (D)]."""
  x = x[:, :seq_len, :, :num_heads_per_group]
  if head_dim is not None:
    x = x[..., :head_dim]
  b, t, hkv, g = x.shape[:4]
  return x.reshape(b, t, hkv * g, *x.shape[4:])


def store_rows(ref, start, value, valid):
  """ref[start + i] = value[i] for the rows i with valid[i]; others untouched.

  Args:
    ref: a Pallas ref whose leading axis is indexed.
    start: int32 scalar, first row.
    value: [R, ...] the rows (cast to ref's dtype).
    valid: bool [R].
  """
  mask = jnp.broadcast_to(valid.reshape((-1,) + (1,) * (value.ndim - 1)),
                          value.shape)
  # Every start int32, also under x64 (where a bare 0 would be int64 and the
  # interpreter's dynamic slice refuses mixed index types).
  index = (pl.ds(jnp.asarray(start, jnp.int32), value.shape[0]),) + tuple(
      pl.ds(jnp.int32(0), size) for size in value.shape[1:])
  plgpu.store(ref.at[index], value.astype(ref.dtype), mask=mask)
