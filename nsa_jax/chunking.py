"""Maps a function over chunks of query positions, in bounded memory."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def num_chunks(seq_len: int, chunk_size: int) -> tuple[int, int]:
  """Returns (chunk, count): the chunk size clipped to T and ceil(T / chunk)."""
  chunk = max(1, min(chunk_size, seq_len))
  return chunk, -(-seq_len // chunk)


def map_query_chunks(body: Callable, per_query: Sequence[jax.Array],
                     chunk_size: int,
                     pad_values: Sequence[float] | None = None):
  """Applies ``body`` to consecutive chunks of the sequence axis (axis 1).

  The body is rematerialised in the backward pass (``jax.checkpoint``), so
  reverse mode keeps only the chunk inputs, not the chunk's score matrices.

  Args:
    body: ``body(*chunks, t0) -> [B, C, ...]`` where each chunk is the
      ``[B, C, ...]`` slice of one ``per_query`` array (None for a None
      entry) and ``t0`` (int32 scalar) is the position of the chunk's first
      query.
    per_query: arrays of shape [B, T, ...] sliced along axis 1, or None
      (optional inputs, e.g. absent document starts); the first is an
      array.
    chunk_size: C (clipped to T). T is padded up to a multiple of C; padded
      rows are computed and dropped, so the body must keep them finite.
    pad_values: value used to pad each array (default 0).

  Returns:
    The bodies' outputs (an array or a pytree of arrays) concatenated along
    axis 1, each of shape [B, T, ...].
  """
  seq_len = per_query[0].shape[1]
  chunk, count = num_chunks(seq_len, chunk_size)
  pad = chunk * count - seq_len
  pad_values = pad_values or [0] * len(per_query)

  def split(x, fill):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2),
                constant_values=fill)
    x = x.reshape(x.shape[0], count, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)  # [count, B, C, ...]

  present = [x is not None for x in per_query]
  chunks = [split(x, v) for x, v in zip(per_query, pad_values)
            if x is not None]
  starts = jnp.arange(count, dtype=jnp.int32) * chunk

  @jax.checkpoint
  def step(args):
    *xs, t0 = args
    xs = iter(xs)
    return body(*[next(xs) if p else None for p in present], t0)

  if count == 1:
    out = jax.tree.map(lambda y: y[None],
                       step((*[c[0] for c in chunks], starts[0])))
  else:
    out = jax.lax.map(step, (*chunks, starts))

  def merge(y):  # [count, B, C, ...] -> [B, T, ...]
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], count * chunk, *y.shape[3:])[:, :seq_len]

  return jax.tree.map(merge, out)
