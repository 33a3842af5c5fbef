"""The group-centric tiling shared by the kernels (NSA section 3.4).

Every forward kernel runs on the grid (batch, tile of ``block_q`` query
positions, kv head) and sees the queries of all G heads of that kv head's
group at once: a ``[block_q, Gp, D]`` block of a ``[B, Tp, Hkv, Gp, D]``
array (``triton_compat.group_heads``), flattened in the kernel to
``rows = block_q * Gp`` rows for the tensor cores.

Packed sequences (documents) reach a kernel as one optional extra input,
``starts`` int32 [B, Tp]: the first position of each query's document. As a
document is contiguous, a key s <= t is in t's document iff
``s >= starts[t]``; so the masks need no key-side ids. Kernels take it only
when given (a static flag), after their other inputs.

A query offset (context parallelism: one sequence shard's queries, at
positions ``o .. o + Tq - 1`` of the keys) is another optional input,
``offset`` int32 [1], after the starts: ``o`` is traced inside
``shard_map`` (one program for every shard), so it is read in the kernel,
once per program, and never a static setting. Without it (the int 0) the
kernels are exactly those of a call without offset.
"""

from __future__ import annotations

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

from pallas_kernels import triton_compat as tc


def group_spec(block_q: int, *block: int) -> pl.BlockSpec:
  """BlockSpec of a [B, Tp, Hkv, *block] array on grid (b, q tile, kv head)."""
  return pl.BlockSpec((None, block_q, None) + block,
                      lambda b, i, g: (b, i, g) + (0,) * len(block))


def kv_spec(num_keys: int, dim: int) -> pl.BlockSpec:
  """BlockSpec of all keys [B, num_keys, Hkv, dim] of one (batch, kv head)."""
  return pl.BlockSpec((None, num_keys, None, dim), lambda b, i, g: (b, 0, g, 0))


def starts_spec(block_q: int) -> pl.BlockSpec:
  """BlockSpec of document starts [B, Tp] on grid (b, q tile, kv head)."""
  return pl.BlockSpec((None, block_q), lambda b, i, g: (b, i))


def pad_starts(starts, seq_pad: int, seq_len: int | None = None):
  """int32 [B, Tq] document starts -> [B, seq_pad].

  Padded query positions (computed and dropped) start a document of their
  own at ``seq_len`` (default Tq), the sequence's end: they see no real key,
  and tiles' minima stay those of their real rows.
  """
  fill = starts.shape[1] if seq_len is None else seq_len
  return tc.pad_axis(starts.astype(jnp.int32), 1, seq_pad, fill)


def starts_input(starts, seq_pad: int, spec: pl.BlockSpec):
  """([spec], [padded starts]) with documents, else two empty lists.

  What a launch appends to its ``in_specs`` and inputs.
  """
  if starts is None:
    return [], []
  return [spec], [pad_starts(starts, seq_pad)]


def whole_starts_spec(seq_pad: int) -> pl.BlockSpec:
  """BlockSpec of all document starts [B, Tp] of one batch row."""
  return pl.BlockSpec((None, seq_pad), lambda b, j, g: (b, 0))


def split_starts(refs, documents: bool):
  """(starts_ref or None, the other refs): the optional input comes first."""
  return (refs[0], refs[1:]) if documents else (None, refs)


def offset_operand(q_offset):
  """The kernels' offset input: int32 [1], or None for the int 0 (no input).

  Args:
    q_offset: an int or an integer scalar array (traced inside ``jit`` or
      ``shard_map``).

  Raises:
    TypeError: q_offset is not an integer scalar.
  """
  if isinstance(q_offset, int) and q_offset == 0 and not isinstance(
      q_offset, bool):
    return None  # the kernels of a call without offset
  offset = jnp.asarray(q_offset)
  if isinstance(q_offset, bool) or offset.ndim or not jnp.issubdtype(
      offset.dtype, jnp.integer):
    raise TypeError("q_offset must be an int or an integer scalar array, "
                    f"got {q_offset!r}")
  return offset.reshape(1).astype(jnp.int32)


def offset_value(offset) -> int | None:
  """An ``offset_operand``'s value: 0 for None, None while it is traced.

  Raises:
    ValueError: a concrete offset below 0.
  """
  if offset is None:
    return 0
  try:
    value = int(np.asarray(offset)[0])
  except jax.errors.TracerArrayConversionError:
    return None
  if value < 0:
    raise ValueError(f"q_offset={value} must be >= 0")
  return value


def offset_input(offset):
  """([spec], [offset]) for an ``offset_operand``, two empty lists for None.

  What a launch appends to its ``in_specs`` and inputs, after the starts.
  """
  if offset is None:
    return [], []
  return [pl.BlockSpec((1,), lambda *_: (0,))], [offset]


def split_offset(refs, offset: bool):
  """(offset_ref or None, the other refs): the optional input comes first."""
  return (refs[0], refs[1:]) if offset else (None, refs)


def read_offset(offset_ref):
  """The query offset o (int32 scalar), or None without an offset input."""
  return None if offset_ref is None else offset_ref[0]


def to_rows(x, group_p: int):
  """[positions] -> [positions * Gp]: a per-position value on every row."""
  positions = x.shape[0]
  return jnp.broadcast_to(x[:, None], (positions, group_p)).reshape(
      positions * group_p)


def query_tile(q_ref, offset=None):
  """Loads a [block_q, Gp, Dk] query block as rows.

  Args:
    q_ref: the program's [block_q, Gp, Dk] query block.
    offset: None, or the int32 scalar position of the first query row
      (``read_offset``).

  Returns:
    (q [rows, Dk], t [rows] int32: the query position of each row).
  """
  block_q, group_p, dk = q_ref.shape
  q = q_ref[...].reshape(block_q * group_p, dk)
  return q, row_positions(block_q, group_p, offset)


def query_parts(q_ref, parts):
  """The program's query tile [block_q, Gp, Dk_p] as [rows, width] column
  parts (``triton_compat.dot_parts``), for ``dot_t_over_parts``."""
  block_q, group_p, _ = q_ref.shape
  return [q_ref[:, :, pl.ds(first, width)].reshape(block_q * group_p, width)
          for first, width in parts]


def row_positions(block_q: int, group_p: int, offset=None):
  """int32 [block_q * Gp]: the query position of each row of the program's
  tile (axis 1 of the grid counts tiles; ``offset`` as in ``query_tile``)."""
  first = pl.program_id(1) * block_q
  if offset is not None:
    first = first + offset
  rows = jnp.arange(block_q * group_p, dtype=jnp.int32)
  return first + lax.div(rows, jnp.int32(group_p))


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
