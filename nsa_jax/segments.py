"""Packed sequences: documents from segment ids or cumulative lengths.

A row of ``segment_ids`` (int [B, T]) packs several documents. A document
is a maximal run of equal consecutive ids, so ``[5, 5, 7, 7, 7, 5]`` holds
three documents (positions 0-1, 2-4 and 5): ids only need to change where a
document starts (the usual non-decreasing ids, or any labelling). Every path
of ``nsa_jax.ops`` derives from this one relation what a query may see (docs/
SEMANTICS.md, "Packed sequences"); the kernels take its shortest form, the
start position of each query's document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _starts_here(segment_ids):
  """bool [B, T]: a document starts at t (t = 0 or the id changes)."""
  ids = jnp.asarray(segment_ids)
  previous = jnp.concatenate([ids[:, :1], ids[:, :-1]], axis=1)
  t = jnp.arange(ids.shape[1])
  return (t == 0)[None, :] | (ids != previous)


def document_starts(segment_ids):
  """Position of the first token of each token's document.

  Args:
    segment_ids: int [B, T].

  Returns:
    int32 [B, T], non-decreasing along T, ``starts[b, t] <= t``. Query t and
    key s <= t are in one document iff ``s >= starts[b, t]``.
  """
  new = _starts_here(segment_ids)
  t = jnp.arange(new.shape[1], dtype=jnp.int32)
  return jax.lax.cummax(jnp.where(new, t[None, :], 0), axis=1)


def document_index(segment_ids):
  """0-based index of each token's document within its row.

  Args:
    segment_ids: int [B, T].

  Returns:
    int32 [B, T], non-decreasing, 0 at t = 0; +1 at each document start.
  """
  return jnp.cumsum(_starts_here(segment_ids).astype(jnp.int32), axis=1) - 1


def document_positions(segment_ids):
  """Position of each token inside its document (0 at a document start).

  Args:
    segment_ids: int [B, T].

  Returns:
    int32 [B, T]: ``t - document_starts(segment_ids)[b, t]``.
  """
  t = jnp.arange(jnp.shape(segment_ids)[1], dtype=jnp.int32)
  return t[None, :] - document_starts(segment_ids)


def from_cu_seqlens(cu_seqlens, seq_len: int):
  """Segment ids of one packed row from cumulative lengths (fla, flash-attn).

  Args:
    cu_seqlens: int [N + 1]: ``0 = c_0 <= c_1 <= ... <= c_N = seq_len``;
      document j holds positions ``[c_j, c_{j+1})`` (empty ones allowed).
    seq_len: T.

  Returns:
    int32 [1, T]: the document index of each position.

  Raises:
    ValueError: a concrete ``cu_seqlens`` that does not start at 0, end at
      T, or decrease somewhere.
  """
  cu = jnp.asarray(cu_seqlens)
  if cu.ndim != 1 or cu.shape[0] < 2:
    raise ValueError(f"cu_seqlens must be int [N + 1] with N >= 1, got shape "
                     f"{cu.shape}")
  if not jnp.issubdtype(cu.dtype, jnp.integer):
    raise TypeError(f"cu_seqlens must be integers, got {cu.dtype}")
  try:
    values = np.asarray(cu)
  except jax.errors.TracerArrayConversionError:
    values = None  # traced: cannot be checked here
  if values is not None and (values[0] != 0 or values[-1] != seq_len
                             or np.any(np.diff(values) < 0)):
    raise ValueError(f"cu_seqlens={values.tolist()} must start at 0, never "
                     f"decrease and end at seq_len={seq_len}")
  t = jnp.arange(seq_len, dtype=cu.dtype)
  # Unrolled: no XLA while loop (on a GPU its condition syncs the host).
  return jnp.searchsorted(cu[1:], t, side="right",
                          method="scan_unrolled").astype(jnp.int32)[None, :]


def starts_or_none(segment_ids):
  """``document_starts(segment_ids)``, or None for None (no documents)."""
  return None if segment_ids is None else document_starts(segment_ids)


def check_whole_sequence(segment_ids, q_offset) -> None:
  """Documents are defined on the whole sequence, not on a query slice.

  Raises:
    ValueError: ``segment_ids`` given with ``q_offset`` other than the int 0
      (a context-parallel shard's queries).
  """
  if segment_ids is not None and not (isinstance(q_offset, int)
                                      and q_offset == 0):
    raise ValueError("segment_ids need the whole sequence: q_offset must be "
                     f"0, got {q_offset!r}")
