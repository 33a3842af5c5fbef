"""Branch 3 on a sequence shard: the previous shards' last w - 1 keys.

Inside ``shard_map`` over the sequence axis each shard holds Tl positions
starting at o = shard * Tl. Its queries need the keys ``t - w < s <= t``;
the ones before o live on earlier shards. ``window_frame`` fetches the
last ``H = min(w - 1, o_max)`` of them with ``ppermute`` (one hop per
shard they span) and lays out a frame that the single-device window op
takes unchanged, as the same causal problem:

  frame keys     [halo (H) | local keys (Tl)]
  frame queries  [zeros (H) | local queries (Tl)]   output rows H .. H+Tl-1

Shards with fewer than H keys before them (o < H) would see the missing
keys (zeros from ppermute) as real ones, so their frame is rotated left by
``H - o``: the missing keys move behind every real query, where causality
hides them, and the output is read from row o instead.
"""

from __future__ import annotations

from jax import lax
import jax.numpy as jnp


def halo(x, *, size: int, axis: str, num_shards: int):
  """The ``size`` positions before this shard, gathered from earlier shards.

  Args:
    x: [B, Tl, ...] this shard's slice of the sequence.
    size: H, at most (num_shards - 1) * Tl.
    axis: the sequence mesh axis.
    num_shards: its size.

  Returns:
    [B, H, ...]: positions o - H .. o - 1, zeros where they would be < 0.
  """
  tl = x.shape[1]
  parts = []
  for hop in range(-(-size // tl), 0, -1):  # farthest shard first
    rows = min(tl, size - (hop - 1) * tl)  # its last rows that are needed
    parts.append(lax.ppermute(x[:, tl - rows:], axis,
                              [(s, s + hop) for s in range(num_shards - hop)]))
  return jnp.concatenate(parts, axis=1)


def _rotate(x, shift):
  """x rotated left by a traced ``shift`` along axis 1."""
  n = x.shape[1]
  return lax.dynamic_slice_in_dim(jnp.concatenate([x, x], axis=1), shift, n,
                                  axis=1)


def window_frame(q, k, v, *, window: int, axis: str, num_shards: int):
  """The window problem of this shard as a single-device causal frame.

  Args:
    q: [B, Tl, Hq, Dk]; k: [B, Tl, Hkv, Dk]; v: [B, Tl, Hkv, Dv], this
      shard's slices.
    window: w.
    axis: the sequence mesh axis. num_shards: its size.

  Returns:
    (q_f, k_f, v_f [B, H + Tl, ...], start): run the window op on the frame
    and keep rows ``start .. start + Tl - 1`` (``read_rows``).
  """
  tl = q.shape[1]
  size = min(window - 1, (num_shards - 1) * tl)
  if size == 0:
    return q, k, v, 0
  offset = lax.axis_index(axis) * tl
  shift = jnp.maximum(size - offset, 0)  # missing halo keys (o < H)
  pad_q = jnp.zeros((q.shape[0], size, *q.shape[2:]), q.dtype)
  frames = [jnp.concatenate([pad_q, q], axis=1)]
  for x in (k, v):
    frames.append(jnp.concatenate(
        [halo(x, size=size, axis=axis, num_shards=num_shards), x], axis=1))
  return (*(_rotate(f, shift) for f in frames), size - shift)


def read_rows(out, start, length: int):
  """Rows ``start .. start + length - 1`` (traced start) of a frame output."""
  return lax.dynamic_slice_in_dim(out, start, length, axis=1)
