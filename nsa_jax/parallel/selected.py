"""Branch 2 on a sequence shard: bringing the selected raw K/V blocks home.

A shard's queries (positions o .. o + Tl - 1) pick blocks anywhere before
them. Two ways to make those blocks local, both exact:

``allgather``  every shard receives the whole K and V (T positions); the
               block table stays as it is.
``gather``     every shard receives only the blocks its queries picked on
               other shards: per (batch row, kv head) and source shard up
               to ``capacity`` blocks, through one all-to-all. The request
               masks ([B, Hkv, Ts] per shard, one byte a block) go out by an
               all-gather first. The table is renumbered into a frame
               ``[received blocks (P * capacity) | local blocks (Tl)]``.
               If any shard asks any source for more than ``capacity``
               blocks, all shards take the ``allgather`` path for this
               call (one ``lax.cond`` on a max over shards): exact always,
               cheaper when the picks are concentrated.

Both end in ``attend``, the selected-attention implementation the call
resolved to (the Pallas kernel on a GPU, ``xla.selected_attention``
elsewhere), with the queries' offset into the keys they hold
(``docs/CONTEXT_PARALLEL.md`` has the volumes).

In the gather frame a query's position is ``P * C * l' + (t - o)``: its own
shard's keys keep their distances to it, and every received block lies
before the frame offset, wholly in the past of every query, as the remote
blocks it stands for (they come from earlier shards). So the frame's causal
rule ``s <= P * C * l' + r`` is the global ``s <= t`` block by block.
"""

from __future__ import annotations

from jax import lax
import jax.numpy as jnp


def allgather(q, k, v, block_indices, *, block_size, scale, axis, attend):
  """Selected attention of this shard's queries against the gathered K/V.

  Args:
    q: [B, Tl, Hq, Dk]; k: [B, Tl, Hkv, Dk]; v: [B, Tl, Hkv, Dv] (this
      shard's slices).
    block_indices: int32 [B, Tl, Hkv, n], global block numbers or -1.
    block_size: l'. scale: softmax scale. axis: the sequence mesh axis.
    attend: ``ops.selected_attention``'s implementation signature with
      ``q_offset``: ``attend(q, k, v, block_indices, *, block_size, scale,
      q_offset)``.

  Returns:
    [B, Tl, Hq, Dv].
  """
  gather = lambda x: lax.all_gather(x, axis, axis=1, tiled=True)
  offset = lax.axis_index(axis) * q.shape[1]
  return attend(q, gather(k), gather(v), block_indices,
                block_size=block_size, scale=scale, q_offset=offset)


def _requests(block_indices, first_local, num_blocks):
  """uint8 [B, Hkv, Ts]: 1 for the blocks before ``first_local`` picked."""
  b, tl, hkv, n = block_indices.shape
  idx = block_indices.transpose(0, 2, 1, 3).reshape(b, hkv, tl * n)
  remote = (idx >= 0) & (idx < first_local)
  idx = jnp.where(remote, idx, num_blocks)  # a spill slot, dropped below
  rows = jnp.arange(b)[:, None, None]
  heads = jnp.arange(hkv)[None, :, None]
  need = jnp.zeros((b, hkv, num_blocks + 1), jnp.uint8)
  return need.at[rows, heads, idx].set(1)[..., :num_blocks]


def _ranks(mask, blocks_per_shard):
  """Per shard's span of ``mask [..., P * nb]``: rank of each set entry
  among the set ones of its shard (0-based), and the count per shard."""
  shaped = mask.reshape(*mask.shape[:-1], -1, blocks_per_shard).astype(
      jnp.int32)
  rank = jnp.cumsum(shaped, axis=-1) - 1
  return rank.reshape(mask.shape), shaped.sum(-1)


def gather_selected(q, k, v, block_indices, *, block_size, scale, axis,
                    attend, num_shards, capacity):
  """Selected attention with only the picked remote blocks fetched.

  Needs Tl a multiple of l' (a block never straddles two shards).

  Args:
    q, k, v, block_indices: as ``allgather``.
    block_size: l'. scale: softmax scale. axis: the sequence mesh axis.
    attend: the selected-attention implementation, as ``allgather``.
    num_shards: P.
    capacity: C, blocks per (source shard, batch row, kv head) the
      all-to-all carries; more picks than that switch to ``allgather``.

  Returns:
    [B, Tl, Hq, Dv].
  """
  b, tl, hkv, dk = k.shape
  nb = tl // block_size  # blocks per shard
  num_blocks = nb * num_shards
  me = lax.axis_index(axis)
  need = _requests(block_indices, me * nb, num_blocks)  # [B, Hkv, Ts]
  rank, count = _ranks(need, nb)  # [B, Hkv, Ts], [B, Hkv, P]
  overflow = lax.pmax(jnp.max(count), axis) > capacity

  def fetch(k, v):
    asked = lax.all_gather(need, axis)  # [P(dest), B, Hkv, Ts]
    mine = lax.dynamic_slice_in_dim(asked, me * nb, nb, axis=3)
    send_rank, _ = _ranks(mine, nb)  # [P, B, Hkv, nb]
    slot = jnp.where((mine > 0) & (send_rank < capacity), send_rank,
                     capacity)
    local_block = jnp.broadcast_to(jnp.arange(nb), slot.shape)
    ids = jnp.zeros((num_shards, b, hkv, capacity + 1), jnp.int32)
    dest = jnp.arange(num_shards)[:, None, None, None]
    rows = jnp.arange(b)[None, :, None, None]
    heads = jnp.arange(hkv)[None, None, :, None]
    ids = ids.at[dest, rows, heads, slot].set(local_block)[..., :capacity]

    def exchange(x):  # [B, Tl, Hkv, D] -> [B, P * C * l', Hkv, D]
      blocks = x.reshape(b, nb, block_size, hkv, -1).transpose(0, 3, 1, 2, 4)
      send = blocks[rows, heads, ids]  # [P, B, Hkv, C, l', D]
      got = lax.all_to_all(send, axis, 0, 0)  # [P(source), B, Hkv, C, ...]
      got = got.transpose(1, 0, 3, 4, 2, 5)  # [B, P, C, l', Hkv, D]
      return got.reshape(b, num_shards * capacity * block_size, hkv, -1)

    return (jnp.concatenate([exchange(k), k], axis=1),
            jnp.concatenate([exchange(v), v], axis=1))

  # Frame block of global block j: its received slot, or after them.
  j = jnp.arange(num_blocks)
  received = (j // nb) * capacity + rank
  frame_block = jnp.where(j >= me * nb, num_shards * capacity + j - me * nb,
                          jnp.where(need > 0, received, -1))  # [B, Hkv, Ts]
  idx = block_indices.transpose(0, 2, 1, 3).reshape(b, hkv, -1)
  renamed = jnp.take_along_axis(frame_block, jnp.maximum(idx, 0), axis=2)
  renamed = jnp.where(idx >= 0, renamed, -1).reshape(b, hkv, tl, -1)
  renamed = renamed.transpose(0, 2, 1, 3)
  frame_offset = num_shards * capacity * block_size

  def selected_only(q, k, v):
    k_f, v_f = fetch(k, v)
    return attend(q, k_f, v_f, renamed, block_size=block_size, scale=scale,
                  q_offset=frame_offset)

  def everything(q, k, v):
    return allgather(q, k, v, block_indices, block_size=block_size,
                     scale=scale, axis=axis, attend=attend)

  return lax.cond(overflow, everything, selected_only, q, k, v)
