"""NSA branch 2: attention over selected key blocks (Pallas Triton)."""

from __future__ import annotations

import dataclasses
import functools
import operator
import warnings

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import group_tiles
from pallas_kernels import launch_config
from pallas_kernels import online_softmax
from pallas_kernels import triton_compat as tc

_I32 = jnp.int32


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable settings of one call (the custom_vjp's non-differentiable arg)."""

  block_size: int  # l', keys per selection block
  window: int | None  # keys also need s > t - window
  scale: float
  seq_len: int  # T
  group: int  # G
  head_dim_v: int
  dk_parts: tuple[tuple[int, int], ...]  # tc.dot_parts of Dk (forward)
  launch: launch_config.SelectedLaunchConfig
  segment: int  # S, query positions per dK/dV program
  interpret: bool
  documents: bool  # document starts are an input (group_tiles.split_starts)
  offset: bool  # the query offset is an input (group_tiles.split_offset)
  dq_from_blocks: bool  # dQ partials from the dK/dV pass, no dQ kernel
  fwd_from_blocks: bool  # forward by block-major partials, merged in XLA
  fwd_chunks: int = 1  # query chunks of the block-major forward
  dq_chunks: int = 1  # query chunks of the dK/dV pass giving dQ parts

  @property
  def num_segments(self) -> int:
    """ceil(T / S): a block is selected by at most T positions."""
    return -(-self.seq_len // self.segment)


def _key_mask(t, lower, key_pos, st: _Static):
  """Causal (window, document) visibility, [rows, block_size].

  ``lower`` [rows] holds each row's document start (None: no documents).
  """
  mask = key_pos[None, :] <= t[:, None]
  if st.window is not None:
    mask &= key_pos[None, :] > t[:, None] - st.window
  if lower is not None:
    mask &= key_pos[None, :] >= lower[:, None]
  return mask


def tile_unions(block_indices, block_q: int):
  """Each query tile's distinct selected blocks, ascending, in XLA.

  The kernels walk this list instead of the tile's [block_q, n] table: a
  loop over exactly the blocks to fetch, with no branch in its body, so
  Triton's software pipeliner prefetches the next block's K/V tiles
  (``num_stages``) while this one computes. A branchy loop over the table's
  slots (skipping empty and repeated ones in the kernel) prevents that: on
  the H100, going branch-free took the selected forward at T = 64k,
  Hq 64 / Hkv 4 / D 128 (one position per tile) from 25.6 ms to 17.2 ms.

  Args:
    block_indices: int32 [B, Tp, Hkv, n], entries in [0, Ts) or -1; Tp a
      multiple of ``block_q``.
    block_q: query positions per tile.

  Returns:
    int32 [B, Tp / block_q, Hkv, block_q * n]: per tile, the distinct blocks
    its positions selected, ascending, then -1.
  """
  batch, seq_pad, hkv, n = block_indices.shape
  tiles = seq_pad // block_q
  x = block_indices.reshape(batch, tiles, block_q, hkv, n)
  x = x.transpose(0, 1, 3, 2, 4).reshape(batch, tiles, hkv, block_q * n)
  empty = jnp.iinfo(jnp.int32).max
  x = jnp.sort(jnp.where(x >= 0, x, empty), axis=-1)
  repeat = jnp.concatenate(
      [jnp.zeros_like(x[..., :1], bool), x[..., 1:] == x[..., :-1]], axis=-1)
  x = jnp.sort(jnp.where(repeat, empty, x), axis=-1)
  return jnp.where(x == empty, -1, x).astype(_I32)


def _union_loop(union_ref, idx_ref, t, lower, st: _Static, update,
                carry):
  """Runs ``update`` once per distinct block selected by the tile's positions.

  Each K/V block is fetched once for all positions and heads of the tile
  (NSA section 3.4: blocks shared by the GQA group, here also by
  neighbouring positions); rows whose position did not select the block are
  masked out of it.

  Args:
    union_ref: [U] the tile's row of ``tile_unions``.
    idx_ref: [block_q, n] int32 block table of the tile.
    t: [rows] query position of each row, rows = block_q * Gp.
    lower: [rows] document start of each row, or None.
    st: static settings.
    update: (carry, blk, mask [rows, block_size]) -> carry.
    carry: initial loop carry.

  Returns:
    The final carry.
  """
  block_q = idx_ref.shape[0]
  group_p = t.shape[0] // block_q
  # One position per tile: every row selected every block of the list.
  table = idx_ref[...] if block_q > 1 else None  # [block_q, n]
  count = jnp.sum((union_ref[...] >= 0).astype(_I32), dtype=_I32)
  key_offsets = jnp.arange(st.block_size, dtype=_I32)

  def body(i, carry):
    blk = union_ref[i]
    mask = _key_mask(t, lower, blk * st.block_size + key_offsets, st)
    if block_q > 1:
      # Triton has no reduce_or: any() as a max over int32.
      selected = jnp.max((table == blk).astype(_I32), axis=1) > 0
      selected = jnp.broadcast_to(selected[:, None], (block_q, group_p))
      mask &= selected.reshape(block_q * group_p)[:, None]
    return update(carry, blk, mask)

  return lax.fori_loop(_I32(0), count, body, carry)


def _load_block(ref, blk, block_size):
  return ref[pl.ds(pl.multiple_of(blk * block_size, block_size), block_size),
             :]


def _tile_lower(starts_ref, group_p):
  """[rows] document starts of the tile's rows, or None without documents."""
  if starts_ref is None:
    return None
  return group_tiles.to_rows(starts_ref[...], group_p)


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, union_ref, *refs,
                st: _Static):
  """Online softmax (FlashAttention-2) over the tile's selected blocks.

  Refs: q [block_q, Gp, Dk], k [Tk, Dk], v [Tk, Dv], idx [block_q, n],
  union [U], (starts [block_q]), (offset [1]) -> o [block_q, Gp, Dv],
  m / log2l [block_q, Gp] (``online_softmax`` residuals: row max of the raw
  dots and log2 of the row sum).
  """
  starts_ref, refs = group_tiles.split_starts(refs, st.documents)
  offset_ref, (o_ref, m_ref, log2l_ref) = group_tiles.split_offset(
      refs, st.offset)
  block_q, group_p = q_ref.shape[:2]
  t = group_tiles.row_positions(block_q, group_p,
                                group_tiles.read_offset(offset_ref))
  q_parts = group_tiles.query_parts(q_ref, st.dk_parts)
  lower = _tile_lower(starts_ref, group_p)

  def update(carry, blk, mask):
    keys = pl.ds(pl.multiple_of(blk * st.block_size, st.block_size),
                 st.block_size)
    v = v_ref[keys, :]  # [l', Dv]
    s = tc.dot_t_over_parts(q_parts, k_ref, keys, st.dk_parts)  # raw dots
    return online_softmax.step(carry, s, mask, v, None, st.scale * tc.LOG2E)

  carry = online_softmax.init(t.shape[0], v_ref.shape[-1])
  out, m, log2l, _ = online_softmax.finalize(
      _union_loop(union_ref, idx_ref, t, lower, st, update, carry),
      st.scale)
  o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)
  m_ref[...] = m.reshape(m_ref.shape)
  log2l_ref[...] = log2l.reshape(log2l_ref.shape)


def _dq_kernel(q_ref, k_ref, v_ref, idx_ref, union_ref, do_ref, m_ref,
               log2l_ref, delta_ref, *refs, st: _Static):
  """dQ over the selected blocks, same grid and union loop as the forward.

  Refs: q [block_q, Gp, Dk], k [Tk, Dk], v [Tk, Dv], idx [block_q, n],
  union [U], do [block_q, Gp, Dv], m / log2l / delta [block_q, Gp],
  (starts [block_q]), (offset [1]) -> dq [block_q, Gp, Dk].
  """
  starts_ref, refs = group_tiles.split_starts(refs, st.documents)
  offset_ref, (dq_ref,) = group_tiles.split_offset(refs, st.offset)
  q, t = group_tiles.query_tile(q_ref, group_tiles.read_offset(offset_ref))
  lower = _tile_lower(starts_ref, q_ref.shape[1])
  rows, dk = q.shape
  do = do_ref[...].reshape(rows, do_ref.shape[-1])
  m = m_ref[...].reshape(rows)
  log2l = log2l_ref[...].reshape(rows)
  delta = delta_ref[...].reshape(rows)

  def update(dq, blk, mask):
    k = _load_block(k_ref, blk, st.block_size)
    v = _load_block(v_ref, blk, st.block_size)
    s = tc.dot(q, k, trans_b=True)
    p = online_softmax.probabilities(s, mask, m, log2l, st.scale * tc.LOG2E)
    ds = p * (tc.dot(do, v, trans_b=True) - delta[:, None])
    return dq + tc.dot(ds.astype(k.dtype), k)

  dq = _union_loop(union_ref, idx_ref, t, lower, st, update,
                   jnp.zeros((rows, dk), jnp.float32))
  dq_ref[...] = (dq * st.scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _list_segment(offsets_ref, st: _Static):
  """A block-major program's selection block and its part of the block's
  query list (grid axis 1 is block * num_segments + segment).

  Returns:
    (key positions int32 [l'], lo, hi): the program walks list entries
    [lo, hi) of the inverted table.
  """
  num_segments = _I32(st.num_segments)
  blk = lax.div(pl.program_id(1), num_segments)
  seg = lax.rem(pl.program_id(1), num_segments)
  key_pos = blk * st.block_size + jnp.arange(st.block_size, dtype=_I32)
  lo = offsets_ref[blk] + seg * st.segment
  hi = jnp.minimum(offsets_ref[blk + 1], lo + st.segment)
  return key_pos, lo, hi


def _gather_step(step, lo, hi, q_ref, positions_ref, starts_ref, offset,
                 key_pos, st: _Static):
  """One gather step of a block-major program: the next ``block_q_dkv``
  positions of its list and their queries, all Gp heads each.

  Returns:
    (start: the step's first list entry, valid bool [block_q_dkv]: entries
    before hi, pos int32 [block_q_dkv]: their query rows (0 past hi), q
    [block_q_dkv * Gp, Dk], mask bool [block_q_dkv * Gp, l']: the keys each
    row sees, causal and within its document).
  """
  block_pos = st.launch.block_q_dkv
  _, group_p, dk = q_ref.shape
  start = lo + step * block_pos
  valid = start + jnp.arange(block_pos, dtype=_I32) < hi
  pos = jnp.where(valid, positions_ref[pl.ds(start, block_pos)], 0)
  q = q_ref[pos].reshape(block_pos * group_p, dk)  # gather
  lower = None if starts_ref is None else group_tiles.to_rows(
      starts_ref[pos], group_p)
  t = pos if offset is None else pos + offset
  mask = group_tiles.to_rows(valid, group_p)[:, None] & _key_mask(
      group_tiles.to_rows(t, group_p), lower, key_pos, st)
  return start, valid, pos, q, mask


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, m_ref, log2l_ref, delta_ref,
                offsets_ref, positions_ref, *refs, st: _Static):
  """Partial dK, dV of one selection block from one segment of its queries.

  The block table is inverted in XLA (``_invert_block_table``): the queries
  that selected block j are ``positions[offsets[j]:offsets[j+1]]``, ascending.
  Program (b, j * num_segments + s, g) takes segment s of that list, at most
  S positions, gathers ``block_q_dkv`` of them at a time (all Gp heads each)
  and accumulates dV += P^T dO and dK += dS^T Q (FlashAttention-2 backward)
  in registers: no atomics, no T x T memory. A segment past the list's end
  runs no step and writes zeros; XLA sums the segments.

  With ``dq_from_blocks`` each step also stores its queries' share of dQ,
  dS K (unscaled), at the list entries it walked: entry e of the inverted
  table gets the [Gp, Dk] rows of query ``positions[e]`` against this
  block. The entries are contiguous, so the store is too; ``_sum_dq_parts``
  adds a query's n entries. This replaces the dQ kernel's second walk over
  the blocks (see ``dq_from_blocks``).

  Refs: q [Tp, Gp, Dk], k [l', Dk], v [l', Dv], do [Tp, Gp, Dv],
  m / log2l / delta [Tp, Gp], offsets [Ts + 1], positions [T * n + pad],
  (starts [Tp]), (offset [1]) -> float32 dk [l', Dk], dv [l', Dv] (this
  segment's share), (dq parts [T * n + pad, Gp, Dk] in q's dtype).
  Positions are query rows; row r is query o + r.
  """
  starts_ref, refs = group_tiles.split_starts(refs, st.documents)
  offset_ref, outs = group_tiles.split_offset(refs, st.offset)
  dk_ref, dv_ref, dq_parts_ref = (outs if st.dq_from_blocks
                                  else (*outs, None))
  offset = group_tiles.read_offset(offset_ref)
  _, group_p, dk = q_ref.shape
  block_pos = st.launch.block_q_dkv
  rows = block_pos * group_p
  key_pos, lo, hi = _list_segment(offsets_ref, st)
  k = k_ref[...]
  v = v_ref[...]

  def body(step, carry):
    dk_acc, dv_acc = carry
    start, valid, pos, q, mask = _gather_step(
        step, lo, hi, q_ref, positions_ref, starts_ref, offset, key_pos, st)
    do = do_ref[pos].reshape(rows, v.shape[-1])
    m = m_ref[pos].reshape(rows)
    log2l = log2l_ref[pos].reshape(rows)
    delta = delta_ref[pos].reshape(rows)
    s = tc.dot(q, k, trans_b=True)  # [rows, l'] raw dots
    p = online_softmax.probabilities(s, mask, m, log2l, st.scale * tc.LOG2E)
    ds = p * (tc.dot(do, v, trans_b=True) - delta[:, None])
    dv_acc = dv_acc + tc.dot(p.astype(do.dtype), do, trans_a=True)
    dk_acc = dk_acc + tc.dot(ds.astype(q.dtype), q, trans_a=True)
    if dq_parts_ref is not None:
      part = tc.dot(ds.astype(k.dtype), k).reshape(block_pos, group_p, dk)
      tc.store_rows(dq_parts_ref, start, part, valid)
    return dk_acc, dv_acc

  num_steps = lax.div(jnp.maximum(hi - lo, 0) + block_pos - 1,
                      _I32(block_pos))
  dk_acc, dv_acc = lax.fori_loop(
      _I32(0), num_steps, body,
      (jnp.zeros((st.block_size, dk), jnp.float32),
       jnp.zeros((st.block_size, v.shape[-1]), jnp.float32)))
  dk_ref[...] = dk_acc * st.scale
  dv_ref[...] = dv_acc


def _fwd_parts_kernel(q_ref, k_ref, v_ref, offsets_ref, positions_ref, *refs,
                      st: _Static):
  """Attention of one selection block's queries to it, one segment of them.

  The forward's block-major form (``fwd_from_blocks``), on the dK/dV grid:
  the queries that selected block j are gathered ``block_q_dkv`` positions
  at a time (all Gp heads each), as in ``_dkv_kernel``, and each (query,
  block) entry of the inverted table gets the softmax of the query over
  the block's visible keys alone: its output normalised by its own sum,
  the row max of its raw dots and that sum. ``_merge_fwd_parts`` combines
  a query's n entries by their log-sum-exp.

  Refs: q [Tp, Gp, Dk], k [l', Dk], v [l', Dv], offsets [Ts + 1],
  positions [T * n + pad], (starts [Tp]), (offset [1]) -> o [T * n + pad,
  Gp, Dv] in q's dtype, m [T * n + pad, Gp] float32 (-inf for no visible
  key), l [T * n + pad, Gp] float32.
  """
  starts_ref, refs = group_tiles.split_starts(refs, st.documents)
  offset_ref, (o_ref, m_ref, l_ref) = group_tiles.split_offset(
      refs, st.offset)
  offset = group_tiles.read_offset(offset_ref)
  group_p = q_ref.shape[1]
  block_pos = st.launch.block_q_dkv
  key_pos, lo, hi = _list_segment(offsets_ref, st)
  k = k_ref[...]
  v = v_ref[...]
  c = jnp.float32(st.scale * tc.LOG2E)

  def body(step, carry):
    start, valid, _, q, mask = _gather_step(
        step, lo, hi, q_ref, positions_ref, starts_ref, offset, key_pos, st)
    s = jnp.where(mask, tc.dot(q, k, trans_b=True), -jnp.inf)
    m = jnp.max(s, axis=1)
    m_safe = jnp.where(m == -jnp.inf, jnp.float32(0), m)
    p = jnp.exp2((s - m_safe[:, None]) * c)  # 0 where masked
    l = jnp.sum(p, axis=1)
    o = tc.dot(p.astype(v.dtype), v) / jnp.where(l > 0, l, 1.0)[:, None]
    tc.store_rows(o_ref, start, o.reshape(block_pos, group_p, -1), valid)
    tc.store_rows(m_ref, start, m.reshape(block_pos, group_p), valid)
    tc.store_rows(l_ref, start, l.reshape(block_pos, group_p), valid)
    return carry

  num_steps = lax.div(jnp.maximum(hi - lo, 0) + block_pos - 1,
                      _I32(block_pos))
  lax.fori_loop(_I32(0), num_steps, body, _I32(0))


# Sort keys block * T + t are packed into one int32 while they fit (one sort
# operand, the common case); past it (e.g. T = 2^20 keys of l' = 64, or one
# shard's 2^17 queries against them) the table sorts (block, t) pairs.
PACKED_KEY_LIMIT = 2**31


def _invert_block_table(block_indices, num_blocks, pad, entries=False):
  """Per (batch, kv head): which query positions selected each block.

  A repeated slot is dropped (as in the forward's union loop), so each list
  holds at most T positions: the bound behind the segment count. ``T`` here
  is the number of query rows; ``num_blocks`` counts the key blocks, which
  may be more (queries offset into a longer key sequence).

  Args:
    block_indices: int32 [B, T, Hkv, n], -1 for empty slots.
    num_blocks: Ts.
    pad: trailing entries added to ``positions`` so fixed-size chunk loads
      past the last list stay in bounds.
    entries: also return where each slot went.

  Returns:
    offsets int32 [B, Hkv, Ts + 1] and positions int32 [B, Hkv, T*n + pad]:
    the positions that selected block j are positions[offsets[j]:
    offsets[j+1]], ascending (a CSR matrix of the block table's transpose).
    With ``entries``, a third int32 [B, Hkv, T, n]: the index into
    ``positions`` of each slot (t, i), -1 for an empty or repeated slot.
  """
  batch, seq_len, hkv, n = block_indices.shape
  t = jnp.arange(seq_len, dtype=jnp.int32)[None, :, None, None]
  earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]  # [n, n]
  repeat = jnp.any((block_indices[..., :, None] == block_indices[..., None, :])
                   & earlier, axis=-1)  # [B, T, Hkv, n]: seen in a lower slot
  blk = jnp.where((block_indices >= 0) & ~repeat, block_indices, num_blocks)
  by_head = lambda x: x.transpose(0, 2, 1, 3).reshape(batch, hkv, -1)
  boundaries = jnp.arange(num_blocks + 1, dtype=jnp.int32)
  # The slot each sorted entry came from, carried through the sort only
  # when asked for.
  payload = ((jnp.broadcast_to(jnp.arange(seq_len * n, dtype=jnp.int32),
                               (batch, hkv, seq_len * n)),)
             if entries else ())
  if (num_blocks + 1) * seq_len < PACKED_KEY_LIMIT:
    key, *slot = lax.sort((by_head(blk * seq_len + t), *payload), num_keys=1)
    rows, boundaries = key % seq_len, boundaries * seq_len
  else:
    key, rows, *slot = lax.sort(
        (by_head(blk), by_head(jnp.broadcast_to(t, blk.shape)), *payload),
        num_keys=2)
  positions = tc.pad_axis(rows, 2, rows.shape[-1] + pad)
  # Unrolled: the default "scan" is an XLA while loop, whose condition the
  # GPU runtime reads back on the host every iteration; that blocked the
  # host during each training step (gpu-16k: 196 against 97 ms a step).
  offsets = jax.vmap(jax.vmap(lambda k: jnp.searchsorted(
      k, boundaries, side="left", method="scan_unrolled")))(key)
  if not entries:
    return offsets.astype(jnp.int32), positions.astype(jnp.int32)
  # Invert the sort's permutation: a scatter to distinct indices.
  where = jax.vmap(jax.vmap(lambda s: jnp.zeros_like(s).at[s].set(
      jnp.arange(s.size, dtype=jnp.int32), unique_indices=True)))(slot[0])
  where = where.reshape(batch, hkv, seq_len, n)
  kept = by_head(blk < num_blocks).reshape(batch, hkv, seq_len, n)
  return (offsets.astype(jnp.int32), positions.astype(jnp.int32),
          jnp.where(kept, where, -1))


def _entry_rows(parts, entries):
  """Each slot's row of a per-entry buffer, by the slot's table entry.

  Args:
    parts: [B, Hkv, T*n + pad, ...] rows stored per inverted-table entry.
    entries: int32 [B, Hkv, T, n] from ``_invert_block_table`` (-1: none;
      those slots get entry 0's row, for the caller to mask).

  Returns:
    [B, Hkv, T, n, ...].
  """
  batch, hkv, seq_len, n = entries.shape
  flat = jnp.maximum(entries, 0).reshape(batch, hkv, seq_len * n)
  rows = jax.vmap(jax.vmap(lambda x, i: x[i]))(parts, flat)
  return rows.reshape(batch, hkv, seq_len, n, *parts.shape[3:])


def _merge_fwd_parts(o_parts, m_parts, l_parts, entries, seq_pad: int,
                     st: _Static):
  """A query's n per-block softmaxes, combined by their log-sum-exp.

  Args:
    o_parts: [B, Hkv, T*n + pad, Gp, Dv] per-entry outputs (normalised).
    m_parts, l_parts: float32 [B, Hkv, T*n + pad, Gp] per-entry raw-dot max
      (-inf: no visible key) and sum.
    entries: int32 [B, Hkv, T, n] from ``_invert_block_table``.
    seq_pad: Tp, the residuals' padded length.
    st: static settings.

  Returns:
    (out [B, Tp, Hkv, Gp, Dv] float32, m and log2l float32 [B, Tp, Hkv,
    Gp]): as ``online_softmax.finalize`` gives them (0, 0, 0 for a row that
    sees no key).
  """
  kept = (entries >= 0)[..., None]  # [B, Hkv, T, n, 1]
  # where, not products: entries nobody wrote hold whatever memory held.
  m_e = jnp.where(kept, _entry_rows(m_parts, entries), -jnp.inf)
  l_e = jnp.where(kept, _entry_rows(l_parts, entries), 0.0)
  m = jnp.max(m_e, axis=3)  # [B, Hkv, T, Gp]
  seen = m > -jnp.inf
  m_safe = jnp.where(seen, m, 0.0)
  c = jnp.float32(st.scale * tc.LOG2E)
  w = jnp.where(m_e > -jnp.inf,
                l_e * jnp.exp2((m_e - m_safe[:, :, :, None]) * c), 0.0)
  l = jnp.sum(w, axis=3)
  o_e = jnp.where(kept[..., None],
                  _entry_rows(o_parts, entries).astype(jnp.float32), 0.0)
  l_safe = jnp.where(l > 0, l, 1.0)
  out = jnp.sum(w[..., None] * o_e, axis=3) / l_safe[..., None]
  to_rows = lambda x: tc.pad_axis(jnp.moveaxis(x, 1, 2), 1, seq_pad)
  return (to_rows(out), to_rows(jnp.where(seen, m, 0.0)),
          to_rows(jnp.log2(l_safe)))


def _sum_dq_parts(parts, entries, scale: float):
  """dQ from the dK/dV pass's per-entry shares (``dq_from_blocks``).

  Args:
    parts: [B, Hkv, T*n + pad, Gp, Dk] dS K of each inverted-table entry.
    entries: int32 [B, Hkv, T, n] from ``_invert_block_table``.
    scale: softmax scale.

  Returns:
    float32 [B, T, Hkv, Gp, Dk]: the sum of each query's entries, times
    ``scale``.
  """
  kept = (entries >= 0)[..., None, None]
  # where, not a product: entries nobody wrote hold whatever memory held.
  rows = jnp.where(kept, _entry_rows(parts, entries).astype(jnp.float32), 0.0)
  return (rows.sum(3) * scale).transpose(0, 2, 1, 3, 4)


def _pad_inputs(q, k, v, block_indices, st: _Static):
  hkv = k.shape[2]
  block_q = st.launch.block_q
  seq_pad = tc.round_up(st.seq_len, block_q)
  group_p = tc.next_pow2(st.group)
  dk_p = tc.next_pow2(q.shape[-1], tc.MIN_DOT_DIM)
  dv_p = tc.next_pow2(v.shape[-1], tc.MIN_DOT_DIM)
  keys_pad = tc.round_up(k.shape[1], st.block_size)
  q5 = tc.group_heads(q, hkv, seq_pad, group_p, dk_p)
  k_p = tc.pad_axis(tc.pad_axis(k, 1, keys_pad), 3, dk_p)
  v_p = tc.pad_axis(tc.pad_axis(v, 1, keys_pad), 3, dv_p)
  idx = tc.pad_axis(block_indices.astype(jnp.int32), 1, seq_pad, -1)
  idx = tc.pad_axis(idx, 3, tc.next_pow2(idx.shape[-1]), -1)
  return q5, k_p, v_p, idx


def _union_spec(size: int) -> pl.BlockSpec:
  """BlockSpec of ``tile_unions``' [B, Tp / block_q, Hkv, U] on the grid."""
  return pl.BlockSpec((None, None, None, size), lambda b, i, g: (b, i, g, 0))


# BlockSpecs of the block-major grid (batch, block * segment, kv head) of
# the dK/dV pass and the block-major forward.


def _whole_rows_spec(seq_pad: int, *block: int) -> pl.BlockSpec:
  """All query positions [B, Tp, Hkv, *block] of one (batch, kv head)."""
  return pl.BlockSpec((None, seq_pad, None) + block,
                      lambda b, j, g: (b, 0, g) + (0,) * len(block))


def _key_block_spec(st: _Static, dim: int) -> pl.BlockSpec:
  """The program's selection block of [B, Tk_p, Hkv, dim] keys."""
  segments = st.num_segments  # a Python int: index maps capture no array
  return pl.BlockSpec((None, st.block_size, None, dim),
                      lambda b, j, g: (b, lax.div(j, _I32(segments)), g, 0))


def _table_spec(size: int) -> pl.BlockSpec:
  """A whole [B, Hkv, size] row of the inverted table."""
  return pl.BlockSpec((None, None, size), lambda b, j, g: (b, g, 0))


def _entries_spec(num_entries: int, *block: int) -> pl.BlockSpec:
  """Per-entry results [B, Hkv, E, *block]: every program of a (batch, kv
  head) stores its own entries."""
  return pl.BlockSpec((None, None, num_entries) + block,
                      lambda b, j, g: (b, g, 0) + (0,) * len(block))


def _fwd(q, k, v, block_indices, starts, offset, st: _Static):
  """Forward launch.

  Returns:
    (out [B, T, Hq, Dv], m [B, Tp, Hkv, Gp], log2l [B, Tp, Hkv, Gp], union
    [B, Tp / block_q, Hkv, U]): the output and the backward's residuals,
    left in the grouped layout (the dQ pass walks the same tile unions).
  """
  q5, k_p, v_p, idx = _pad_inputs(q, k, v, block_indices, st)
  batch, seq_pad, hkv, group_p, dk_p = q5.shape
  keys_pad, dv_p = v_p.shape[1], v_p.shape[-1]
  block_q = st.launch.block_q
  # The tile unions serve the query-tile kernels only.
  union = (None if st.fwd_from_blocks and st.dq_from_blocks
           else tile_unions(idx, block_q))
  if st.fwd_from_blocks:
    out, m, log2l = _fwd_blocks_chunked(q5, k_p, v_p, block_indices, starts,
                                        offset, st)
    out = tc.ungroup_heads(out.astype(q.dtype), st.seq_len, st.group,
                           st.head_dim_v)
    return out, m, log2l, union
  rows_shape = jax.ShapeDtypeStruct((batch, seq_pad, hkv, group_p),
                                    jnp.float32)
  starts_spec, starts_arg = group_tiles.starts_input(
      starts, seq_pad, group_tiles.starts_spec(block_q))
  offset_spec, offset_arg = group_tiles.offset_input(offset)
  out, m, log2l = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st),
      grid=(batch, seq_pad // block_q, hkv),
      in_specs=[group_tiles.group_spec(block_q, group_p, dk_p),
                group_tiles.kv_spec(keys_pad, dk_p),
                group_tiles.kv_spec(keys_pad, dv_p),
                group_tiles.group_spec(block_q, idx.shape[-1]),
                _union_spec(union.shape[-1])] + starts_spec + offset_spec,
      out_specs=[group_tiles.group_spec(block_q, group_p, dv_p),
                 group_tiles.group_spec(block_q, group_p),
                 group_tiles.group_spec(block_q, group_p)],
      out_shape=[
          jax.ShapeDtypeStruct((batch, seq_pad, hkv, group_p, dv_p), q.dtype),
          rows_shape, rows_shape,
      ],
      compiler_params=tc.compiler_params(st.launch.num_warps,
                                         st.launch.num_stages),
      interpret=st.interpret,
      name="nsa_selected_attention_fwd",
  )(q5, k_p, v_p, idx, union, *starts_arg, *offset_arg)
  out = tc.ungroup_heads(out, st.seq_len, st.group, st.head_dim_v)
  return out, m, log2l, union


def _query_chunks(seq_len: int, seq_pad: int, chunks: int, offset,
                  st: _Static):
  """Query chunks of a block-major pass whose buffer is over the cap.

  Chunk [a, b) runs the pass on its own rows of q (and of the block table,
  the document starts and the backward's residuals) against all keys, with
  query offset (offset or 0) + a, so its buffer is a chunk's share. The
  inverted table of a chunk lists only its queries, and its programs walk
  at most its own length (``launch_config.selected_segment``).

  Yields:
    (a, b, rows, offset, st): rows [a, b) of the padded inputs, of which
    the first ``rows`` are real positions, and the chunk's offset and
    settings. The last chunk takes the padding; one chunk is the whole
    call, with its own offset and settings.
  """
  if chunks == 1:
    yield 0, seq_pad, seq_len, offset, st
    return
  size = tc.round_up(-(-seq_len // chunks), tc.MIN_DOT_DIM)
  base = jnp.zeros((1,), _I32) if offset is None else offset
  for a in range(0, seq_len, size):
    b = a + size if a + size < seq_len else seq_pad
    rows = min(b, seq_len) - a
    yield a, b, rows, base + a, dataclasses.replace(
        st, seq_len=rows, offset=True,
        segment=launch_config.selected_segment(rows, st.launch.block_q_dkv))


def _fwd_blocks_chunked(q5, k_p, v_p, block_indices, starts, offset,
                        st: _Static):
  """The block-major forward in ``st.fwd_chunks`` query chunks
  (``_query_chunks``).

  Returns:
    (out float32 [B, Tp, Hkv, Gp, Dv], m, log2l float32 [B, Tp, Hkv, Gp]).
  """
  parts = [
      _fwd_blocks_pass(q5[:, a:b], k_p, v_p, block_indices[:, a:a + rows],
                       None if starts is None else starts[:, a:a + rows],
                       offset_c, st_c)
      for a, b, rows, offset_c, st_c in _query_chunks(
          block_indices.shape[1], q5.shape[1], st.fwd_chunks, offset, st)]
  return tuple(jnp.concatenate(x, axis=1) for x in zip(*parts))


def _fwd_blocks_pass(q5, k_p, v_p, block_indices, starts, offset,
                     st: _Static):
  """The forward by ``_fwd_parts_kernel`` and ``_merge_fwd_parts``.

  Returns:
    (out float32 [B, Tp, Hkv, Gp, Dv], m, log2l float32 [B, Tp, Hkv, Gp]).
  """
  batch, seq_pad, hkv, group_p, dk_p = q5.shape
  keys_pad, dv_p = v_p.shape[1], v_p.shape[-1]
  num_blocks = keys_pad // st.block_size
  num_segments = st.num_segments
  offsets, positions, entries = _invert_block_table(
      block_indices, num_blocks, st.launch.block_q_dkv, entries=True)
  num_entries = positions.shape[-1]
  starts_spec, starts_arg = group_tiles.starts_input(
      starts, seq_pad, group_tiles.whole_starts_spec(seq_pad))
  offset_spec, offset_arg = group_tiles.offset_input(offset)

  parts_shape = lambda *block, dtype=jnp.float32: jax.ShapeDtypeStruct(
      (batch, hkv, num_entries) + block, dtype)
  o_parts, m_parts, l_parts = pl.pallas_call(
      functools.partial(_fwd_parts_kernel, st=st),
      grid=(batch, num_blocks * num_segments, hkv),
      in_specs=[_whole_rows_spec(seq_pad, group_p, dk_p),
                _key_block_spec(st, dk_p), _key_block_spec(st, dv_p),
                _table_spec(offsets.shape[-1]), _table_spec(num_entries)]
      + starts_spec + offset_spec,
      out_specs=[_entries_spec(num_entries, group_p, dv_p),
                 _entries_spec(num_entries, group_p),
                 _entries_spec(num_entries, group_p)],
      out_shape=[parts_shape(group_p, dv_p, dtype=q5.dtype),
                 parts_shape(group_p), parts_shape(group_p)],
      compiler_params=tc.compiler_params(st.launch.num_warps,
                                         st.launch.num_stages),
      interpret=st.interpret,
      name="nsa_selected_attention_fwd_blocks",
  )(q5, k_p, v_p, offsets, positions, *starts_arg, *offset_arg)
  return _merge_fwd_parts(o_parts, m_parts, l_parts, entries, seq_pad, st)


def _bwd(q, k, v, block_indices, starts, offset, out, m, log2l, union, d_out,
         st: _Static):
  q5, k_p, v_p, idx = _pad_inputs(q, k, v, block_indices, st)
  seq_pad, dv_p = q5.shape[1], v_p.shape[-1]
  do5, delta4 = group_tiles.delta_rows(out, d_out, q5, dv_p)
  residuals = (do5, m, log2l, delta4)
  if st.dq_from_blocks:
    dq, dk, dv = _bwd_blocks_chunked(q5, k_p, v_p, block_indices, starts,
                                     offset, residuals, st)
  else:
    starts_spec, starts_arg = group_tiles.starts_input(
        starts, seq_pad, group_tiles.starts_spec(st.launch.block_q))
    offset_spec, offset_arg = group_tiles.offset_input(offset)
    dq = _dq_pass(q5, k_p, v_p, idx, union, residuals,
                  starts_spec + offset_spec, starts_arg + offset_arg, st)
    _, dk, dv = _bwd_blocks(q5, k_p, v_p, block_indices, starts, offset,
                            residuals, st)
  dq = tc.ungroup_heads(dq, st.seq_len, st.group, q.shape[-1]).astype(q.dtype)
  keys, dim_k, dim_v = k.shape[1], k.shape[-1], v.shape[-1]
  return (dq, dk[:, :keys, :, :dim_k].astype(k.dtype),
          dv[:, :keys, :, :dim_v].astype(v.dtype))


def _bwd_blocks(q5, k_p, v_p, block_indices, starts, offset, residuals,
                st: _Static):
  """The dK/dV pass on whole rows of q, with dQ summed from its parts when
  ``st.dq_from_blocks`` (else None).

  Returns:
    (dQ float32 [B, T, Hkv, Gp, Dk_p] or None, dK float32 [B, Tk_p, Hkv,
    Dk_p], dV float32 [B, Tk_p, Hkv, Dv_p]).
  """
  seq_pad = q5.shape[1]
  starts_spec, starts_arg = group_tiles.starts_input(
      starts, seq_pad, group_tiles.whole_starts_spec(seq_pad))
  offset_spec, offset_arg = group_tiles.offset_input(offset)
  dk, dv, dq_parts, entries = _dkv_pass(
      q5, k_p, v_p, block_indices, residuals, starts_spec + offset_spec,
      starts_arg + offset_arg, st)
  dq = (None if dq_parts is None
        else _sum_dq_parts(dq_parts, entries, st.scale))
  return dq, dk, dv


def _bwd_blocks_chunked(q5, k_p, v_p, block_indices, starts, offset,
                        residuals, st: _Static):
  """``_bwd_blocks`` with dQ parts, in ``st.dq_chunks`` query chunks
  (``_query_chunks``): the chunks' dK and dV summed in chunk order."""
  dq, dk, dv = zip(*(
      _bwd_blocks(q5[:, a:b], k_p, v_p, block_indices[:, a:a + rows],
                  None if starts is None else starts[:, a:a + rows],
                  offset_c, tuple(x[:, a:b] for x in residuals), st_c)
      for a, b, rows, offset_c, st_c in _query_chunks(
          block_indices.shape[1], q5.shape[1], st.dq_chunks, offset, st)))
  return (jnp.concatenate(dq, axis=1), functools.reduce(operator.add, dk),
          functools.reduce(operator.add, dv))


def _dq_pass(q5, k_p, v_p, idx, union, residuals, extra_specs, extra_args,
             st: _Static):
  """dQ [B, Tp, Hkv, Gp, Dk] by the query-tile kernel (the forward's grid).

  ``residuals`` are (dO, m, log2l, delta) in the grouped layout;
  ``extra_specs``/``extra_args`` the optional starts and offset inputs.
  """
  batch, seq_pad, hkv, group_p, dk_p = q5.shape
  keys_pad, dv_p = k_p.shape[1], v_p.shape[-1]
  block_q = st.launch.block_q
  rows = group_tiles.group_spec(block_q, group_p)
  return pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(batch, seq_pad // block_q, hkv),
      in_specs=[group_tiles.group_spec(block_q, group_p, dk_p),
                group_tiles.kv_spec(keys_pad, dk_p),
                group_tiles.kv_spec(keys_pad, dv_p),
                group_tiles.group_spec(block_q, idx.shape[-1]),
                _union_spec(union.shape[-1]),
                group_tiles.group_spec(block_q, group_p, dv_p),
                rows, rows, rows] + extra_specs,
      out_specs=group_tiles.group_spec(block_q, group_p, dk_p),
      out_shape=jax.ShapeDtypeStruct(q5.shape, q5.dtype),
      compiler_params=tc.compiler_params(st.launch.num_warps,
                                         st.launch.num_stages),
      interpret=st.interpret,
      name="nsa_selected_attention_dq",
  )(q5, k_p, v_p, idx, union, *residuals, *extra_args)


def _dkv_pass(q5, k_p, v_p, block_indices, residuals, extra_specs,
              extra_args, st: _Static):
  """dK, dV by the block-major kernel, and its dQ parts when asked.

  Args:
    q5, k_p, v_p: the padded, grouped inputs.
    block_indices: int32 [B, T, Hkv, n], the unpadded table.
    residuals: (dO, m, log2l, delta) in the grouped layout.
    extra_specs, extra_args: the optional starts (whole rows) and offset.
    st: static settings.

  Returns:
    (dK float32 [B, Tk_p, Hkv, Dk_p], dV float32 [B, Tk_p, Hkv, Dv_p],
    dQ parts [B, Hkv, T*n + pad, Gp, Dk_p] and their table entries
    [B, Hkv, T, n]) with ``st.dq_from_blocks``, else the last two None.
  """
  batch, seq_pad, hkv, group_p, dk_p = q5.shape
  keys_pad, dv_p = k_p.shape[1], v_p.shape[-1]
  num_blocks = keys_pad // st.block_size
  num_segments = st.num_segments
  inverted = _invert_block_table(block_indices, num_blocks,
                                 st.launch.block_q_dkv,
                                 entries=st.dq_from_blocks)
  offsets, positions = inverted[:2]

  def partial_block(dim):  # one [l', dim] slot per (block, segment)
    return pl.BlockSpec((None, st.block_size, None, dim),
                        lambda b, j, g: (b, j, g, 0))

  partial_keys = keys_pad * num_segments
  out_specs = [partial_block(dk_p), partial_block(dv_p)]
  out_shape = [
      jax.ShapeDtypeStruct((batch, partial_keys, hkv, dk_p), jnp.float32),
      jax.ShapeDtypeStruct((batch, partial_keys, hkv, dv_p), jnp.float32),
  ]
  if st.dq_from_blocks:
    num_entries = positions.shape[-1]
    out_specs.append(_entries_spec(num_entries, group_p, dk_p))
    out_shape.append(jax.ShapeDtypeStruct(
        (batch, hkv, num_entries, group_p, dk_p), q5.dtype))
  dk, dv, *dq_parts = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st),
      grid=(batch, num_blocks * num_segments, hkv),
      in_specs=[_whole_rows_spec(seq_pad, group_p, dk_p),
                _key_block_spec(st, dk_p), _key_block_spec(st, dv_p),
                _whole_rows_spec(seq_pad, group_p, dv_p)]
      + [_whole_rows_spec(seq_pad, group_p)] * 3
      + [_table_spec(offsets.shape[-1]), _table_spec(positions.shape[-1])]
      + extra_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=tc.compiler_params(st.launch.num_warps,
                                         st.launch.num_stages),
      interpret=st.interpret,
      name="nsa_selected_attention_dkv",
  )(q5, k_p, v_p, *residuals, offsets, positions, *extra_args)

  def sum_segments(x):
    # [B, Ts * segs * l', Hkv, D] -> [B, Ts, segs, l', Hkv, D]: a fixed-order
    # sum over segments, deterministic.
    x = x.reshape(batch, num_blocks, num_segments, st.block_size, hkv, -1)
    return jnp.sum(x, axis=2).reshape(batch, keys_pad, hkv, -1)

  if not st.dq_from_blocks:
    return sum_segments(dk), sum_segments(dv), None, None
  return sum_segments(dk), sum_segments(dv), dq_parts[0], inverted[2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _selected_attention(q, k, v, block_indices, starts, offset, st: _Static):
  return _fwd(q, k, v, block_indices, starts, offset, st)[0]


def _vjp_fwd(q, k, v, block_indices, starts, offset, st: _Static):
  out, m, log2l, union = _fwd(q, k, v, block_indices, starts, offset, st)
  if st.dq_from_blocks:  # only the dQ kernel walks the tile unions again
    union = None
  return out, (q, k, v, block_indices, starts, offset, out, m, log2l, union)


def _vjp_bwd(st: _Static, residuals, d_out):
  dq, dk, dv = _bwd(*residuals, d_out, st)
  # The integer block table, document starts and offset have no cotangent.
  return dq, dk, dv, None, None, None


_selected_attention.defvjp(_vjp_fwd, _vjp_bwd)


def valid_block_indices(block_indices, num_blocks: int):
  """Slots outside [0, num_blocks) become -1 (empty), as the spec says.

  Args:
    block_indices: int [B, T, Hkv, n].
    num_blocks: Ts = ceil(T / l').

  Returns:
    int32 [B, T, Hkv, n].
  """
  idx = block_indices
  if idx.dtype.itemsize < 4:  # num_blocks may not fit a narrow type
    idx = idx.astype(jnp.int32)
  keep = (idx >= 0) & (idx < num_blocks)
  return jnp.where(keep, idx, -1).astype(jnp.int32)


def _non_finite_keys(k, v, block_indices, doc_starts, offset, st: _Static):
  """Masked keys contribute nothing, whatever they hold (issue 10, item 4).

  Rows of K or V with a non-finite entry are zeroed before the kernel (so
  0 * inf never reaches a product), and the queries that can see one of them
  are found here, in XLA, to be set to NaN after it, as every path of the
  library does. Doing this outside the kernel keeps its loop free of
  per-tile checks (done per K/V tile in the loop, they made the forward 2.3x
  slower at T = 64k on an H100: each tile had to pass through registers
  before its matmul). Cost: one read and write of K and V, and a gather of
  one int32 per (position, slot).

  Args:
    k: [B, Tk, Hkv, Dk]; v: [B, Tk, Hkv, Dv].
    block_indices: int32 [B, T, Hkv, n], entries in [0, ceil(Tk / l')) or
      -1.
    doc_starts: int32 [B, T] document starts, or None (then Tk = T).
    offset: None (Tk = T without ``window``), or int32 [1]: query row r is
      at key position offset + r.
    st: static settings (with ``window``, the table must cover the window,
      as ``sliding_window`` builds it; no offset then).

  Returns:
    (k, v with bad rows zeroed, bool [B, T, Hkv]: the query sees a bad key).
  """
  batch, seq_len, hkv, _ = block_indices.shape
  num_keys = k.shape[1]
  bad = ~(jnp.isfinite(k).all(-1) & jnp.isfinite(v).all(-1))  # [B, Tk, Hkv]
  k = jnp.where(bad[..., None], jnp.zeros((), k.dtype), k)
  v = jnp.where(bad[..., None], jnp.zeros((), v.dtype), v)
  if doc_starts is not None:
    return k, v, _sees_bad_in_document(bad, block_indices, doc_starts, st)
  t = jnp.arange(seq_len, dtype=jnp.int32)[None, :, None]
  if st.window is not None:
    # Keys t - w < s <= t: a count of bad keys over that range.
    count = jnp.cumsum(bad.astype(jnp.int32), axis=1)
    before = jnp.pad(count, ((0, 0), (st.window, 0), (0, 0)))[:, :seq_len]
    return k, v, count - before > 0
  # Selected blocks: the first bad position of each block is <= t.
  num_blocks = -(-num_keys // st.block_size)
  s = jnp.arange(num_keys, dtype=jnp.int32)[None, :, None]
  pos = jnp.where(bad, s, jnp.int32(2 ** 30))
  pos = tc.pad_axis(pos, 1, num_blocks * st.block_size, 2 ** 30)
  if offset is not None:
    t = t + offset
  first_bad = pos.reshape(batch, num_blocks, st.block_size, hkv).min(2)
  n = block_indices.shape[-1]
  idx = jnp.maximum(block_indices, 0).transpose(0, 2, 1, 3)  # [B, Hkv, T, n]
  gathered = jnp.take_along_axis(
      first_bad.transpose(0, 2, 1), idx.reshape(batch, hkv, seq_len * n),
      axis=2).reshape(batch, hkv, seq_len, n).transpose(0, 2, 1, 3)
  sees = (block_indices >= 0) & (gathered <= t[..., None])
  return k, v, sees.any(-1)


def _sees_bad_in_document(bad, block_indices, doc_starts, st: _Static):
  """``_non_finite_keys``' answer with documents: bool [B, T, Hkv].

  Query t reads the keys ``starts[t] <= s <= t`` of its window or of each
  selected block; a difference of running counts of bad keys over each such
  range finds the queries that see one.
  """
  batch, seq_len, hkv = bad.shape
  count = jnp.cumsum(bad.astype(jnp.int32), axis=1)
  count = jnp.pad(count, ((0, 0), (1, 0), (0, 0)))  # [B, T + 1, Hkv]
  t = jnp.arange(seq_len, dtype=jnp.int32)[None, :, None, None]
  starts = doc_starts.astype(jnp.int32)[:, :, None, None]  # [B, T, 1, 1]
  if st.window is not None:  # one range per query: [B, T, 1, Hkv]
    lo = jnp.maximum(t - st.window + 1, starts)
    hi, use = t, True
    lo, hi = (jnp.broadcast_to(x, (batch, seq_len, 1, hkv)) for x in (lo, hi))
  else:  # one range per slot: [B, T, n, Hkv]
    blk = block_indices.transpose(0, 1, 3, 2)
    lo = jnp.maximum(blk * st.block_size, starts)
    hi = jnp.minimum(blk * st.block_size + st.block_size - 1, t)
    use = (blk >= 0) & (hi >= lo)
  slots = lo.shape[2]
  at = lambda p: jnp.take_along_axis(
      count, jnp.clip(p, 0, seq_len).reshape(batch, seq_len * slots, hkv),
      axis=1).reshape(batch, seq_len, slots, hkv)
  return (use & (at(hi + 1) - at(lo) > 0)).any(2)


def supports_block_size(block_size: int) -> bool:
  """Whether the kernel takes this l': a power of two >= tc.MIN_DOT_DIM."""
  return block_size >= tc.MIN_DOT_DIM and not block_size & (block_size - 1)


def selected_attention(q, k, v, block_indices, *, block_size: int,
                       scale: float | None = None,
                       window: int | None = None,
                       interpret: bool | None = None,
                       block_q: int | None = None,
                       block_q_dkv: int | None = None,
                       dkv_segment: int | None = None,
                       num_warps: int | None = None,
                       num_stages: int | None = None,
                       block_k: int | None = None,
                       doc_starts=None,
                       q_offset=0,
                       dq_from_blocks: bool | None = None,
                       fwd_from_blocks: bool | None = None):
  """NSA branch 2 (section 3.3.2) with the kernel design of section 3.4.

  One program per (batch, tile of ``block_q`` query positions, kv head) loads
  the queries of all G heads of the group (``block_q * next_pow2(G)`` rows,
  >= 16 for the tensor cores), walks the tile's distinct selected blocks
  (``tile_unions``, sorted in XLA) fetching each K/V block once (a
  data-dependent load), and runs a FlashAttention-2 online softmax over them
  with keys s > t masked. With
  G >= 16 the table picks ``block_q = 1``: the paper's design exactly. Smaller
  groups tile neighbouring positions, whose block sets overlap heavily (the
  forced initial and local blocks at least); rows whose position did not
  select a block are masked out of it. At G <= 8 most of those rows are
  masked, so there the forward runs block-major instead
  (``fwd_from_blocks``): on the dK/dV pass's grid, each program gathers the
  queries that selected its block and stores, per (query, block) entry of
  the inverted table, the softmax over that block alone (output, row max,
  sum); XLA merges a query's n entries by their log-sum-exp.

  Backward: dQ on the forward's grid; dK/dV KV-block-major over an inverted
  block table (sorted in XLA), deterministic and without atomics. Atomic adds
  were not used: every query adds into the forced initial block, so their
  contention would serialise at that block. For small groups dQ comes from
  the dK/dV pass instead (``dq_from_blocks``): that pass already has each
  (query, block) pair's dS, so one more matmul gives the pair's share of dQ,
  stored per entry of the inverted table and summed per query in XLA. It
  saves the dQ kernel's walk over the tile union, where at G <= 8 most
  rows are masked (a tile's positions chose different blocks), for a
  buffer of n shares per query row.

  The same skew unbalances the KV-block-major programs: block 0's list holds
  all T positions, the average one about T * n / Ts (64x less at T = 64k,
  n = 16, l' = 64). Each list is therefore split into segments of S
  positions, one program per (batch, block * segment, kv head), so the
  longest program walks S positions, not T. Triton has no dynamic grid, so
  the segment count is static: the worst case ceil(T / S), with programs
  past their list's end writing zeros. Each program writes a float32
  partial, summed over segments in XLA (fixed order, deterministic). The
  trade-off is that buffer, ceil(T / S) float32 copies of dK and dV: S
  (``launch_config.selected_segment``) grows with T to keep the count <=
  ``SELECTED_MAX_SEGMENTS`` (8: 16x the bf16 dK/dV bytes), so the longest
  program does <= T / 8 positions, already below the per-SM share of the
  total work (B * Hkv * T * n / #SMs) for the paper's shapes.

  Query offset (context parallelism): with ``q_offset`` o, row r of q is
  the query at key position o + r, and k, v may be longer than q (all the
  keys of the sequence, or a frame of gathered blocks followed by the
  shard's own keys). The causal rule is ``s <= o + r`` in the keys'
  numbering; o is a kernel input read once per program. The dK/dV grid and
  partials then cover all Tk keys, so ``selected_segment`` takes fewer
  segments (down to one when Tk >= 8 T: the partials stay within 8 T key
  rows, at the price of block 0's program walking all T positions).

  Args:
    q: [B, T, Hq, Dk] queries, Hq = G * Hkv.
    k: [B, Tk, Hkv, Dk] keys; Tk = T without ``q_offset``, else
      Tk >= q_offset + T.
    v: [B, Tk, Hkv, Dv] values.
    block_indices: int [B, T, Hkv, n] selected blocks in [0, ceil(Tk/l'))
      or -1 for an empty slot; repeats are counted once.
    block_size: l', keys per selection block; a power of two >= 16.
    scale: softmax scale, defaults to 1/sqrt(Dk).
    window: if set, keys also need s > t - window (branch 3 uses this).
    interpret: run in Pallas interpret mode; None means "when no GPU".
    block_q: query positions per program; None: from the launch table.
    block_q_dkv: query positions per dK/dV gather step; None: from the
      table.
    dkv_segment: S, query positions per dK/dV program; a power of two >=
      the gather step. None: ``launch_config.selected_segment``.
    num_warps: Triton warps; None: from the launch table.
    num_stages: Triton pipelining stages; None: from the launch table.
    block_k: deprecated name of ``block_q_dkv`` (it counts query positions,
      not keys).
    doc_starts: optional int32 [B, T], non-decreasing, ``<= t``: the first
      position of each query's document (packed sequences); keys before it
      are masked per token, in the forward and both gradients.
    q_offset: position of q's first row among the keys: an int or an
      integer scalar array (traced inside ``shard_map``). Any other value
      than the int 0 is a kernel input; not with ``window`` or
      ``doc_starts``.
    dq_from_blocks: dQ from the dK/dV pass (True) or from the dQ kernel
      (False); None: ``launch_config.selected_block_major``. The shares
      are stored in q's dtype, so in bf16 dQ carries up to n roundings to
      bf16 (each 2^-9 relative) instead of one.
    fwd_from_blocks: the forward block-major (True: per-(query, block)
      softmaxes on the dK/dV grid, merged by log-sum-exp in XLA) or by the
      query-tile kernel (False); None: ``launch_config.selected_block_major``.
      The partial outputs are stored in q's dtype before the merge.
      A block-major pass whose buffer (dQ shares, forward partials) is over
      ``launch_config.SELECTED_PARTS_MAX_BYTES`` runs in query chunks
      within it, one launch each (``launch_config.selected_chunks``), so
      at G <= 8 both passes are block-major at any length.

  Returns:
    [B, T, Hq, Dv] in q.dtype. A query whose selected blocks hold no key
    s <= t (in its document) gets 0, with zero (never NaN) gradients.
    Slots outside [0, ceil(Tk / l')) are empty, like -1. Keys a query cannot
    see contribute nothing whatever their values; a query that sees a
    non-finite key or value gets NaN. Precision: see ``online_softmax``;
    the backward's probabilities are as exact as the logits at any scale.

  Raises:
    ValueError: on inconsistent shapes or block sizes; a concrete q_offset
      below 0 or with Tk < q_offset + T; q_offset with window or
      doc_starts.
    TypeError: a q_offset that is not an integer scalar.
  """
  batch, seq_len, num_heads, head_dim = q.shape
  offset_arg = group_tiles.offset_operand(q_offset)  # None: no offset
  offset = group_tiles.offset_value(offset_arg)  # None: traced
  shifted = offset_arg is not None
  if k.shape[0] != batch or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"{q.shape=}, {k.shape=} and {v.shape=} disagree on "
                     "batch, sequence or kv heads")
  if not shifted and k.shape[1] != seq_len:
    raise ValueError(f"{q.shape=} and {k.shape=} disagree on sequence "
                     "length (give q_offset for queries inside longer keys)")
  reach = seq_len + (offset or 0)  # a traced offset is >= 0
  if shifted and k.shape[1] < reach:
    raise ValueError(f"queries up to position {reach - 1} need Tk >= "
                     f"{reach} keys, got {k.shape=}")
  if shifted and (window is not None or doc_starts is not None):
    raise ValueError("q_offset is for selected blocks of the whole sequence:"
                     " not with window or doc_starts, got "
                     f"{q_offset=!r}, {window=}, doc_starts "
                     f"{'given' if doc_starts is not None else 'None'}")
  if k.shape[-1] != head_dim:
    raise ValueError(f"{q.shape=} and {k.shape=} disagree on Dk")
  num_kv_heads = k.shape[2]
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(f"Hq={num_heads} is not a multiple of Hkv={num_kv_heads}")
  if block_indices.shape[:3] != (batch, seq_len, num_kv_heads):
    raise ValueError(f"{block_indices.shape=} must be [B, T, Hkv, n] for "
                     f"{q.shape=} and {k.shape=}")
  if not supports_block_size(block_size):
    raise ValueError(f"{block_size=} must be a power of two >= "
                     f"{tc.MIN_DOT_DIM}")
  if window is not None and window < 1:
    raise ValueError(f"{window=} must be >= 1")
  if scale is not None and not scale > 0:
    raise ValueError(f"{scale=} must be > 0 (the kernel takes row maxima of "
                     "the raw dots)")
  if not jnp.issubdtype(block_indices.dtype, jnp.integer):
    raise ValueError(f"{block_indices.dtype=} must be an integer type")
  if block_k is not None:
    warnings.warn("selected_attention(block_k=...) is deprecated: it counts "
                  "query positions of the dK/dV step; pass block_q_dkv",
                  DeprecationWarning, stacklevel=2)
    if block_q_dkv is not None:
      raise ValueError("give block_q_dkv or its old name block_k, not both")
    block_q_dkv = block_k
  group = num_heads // num_kv_heads
  launch = launch_config.resolve(
      "selected", group=group, seq_len=seq_len,
      head_dim=max(head_dim, v.shape[-1]),
      itemsize=jnp.dtype(q.dtype).itemsize, block_q=block_q,
      block_q_dkv=block_q_dkv, num_warps=num_warps, num_stages=num_stages)
  if dkv_segment is None:
    dkv_segment = launch_config.selected_segment(seq_len, launch.block_q_dkv,
                                                 k.shape[1])
  if dkv_segment < launch.block_q_dkv or dkv_segment & (dkv_segment - 1):
    raise ValueError(f"{dkv_segment=} must be a power of two >= "
                     f"block_q_dkv={launch.block_q_dkv}")
  if doc_starts is not None and doc_starts.shape != (batch, seq_len):
    raise ValueError(f"{doc_starts.shape=} must be [B, T] = "
                     f"{(batch, seq_len)}")
  parts_bytes = lambda dim, forward: launch_config.selected_parts_bytes(  # noqa: E731
      slots=batch * seq_len * num_heads * block_indices.shape[-1],
      dim=tc.next_pow2(dim, tc.MIN_DOT_DIM),
      itemsize=jnp.dtype(q.dtype).itemsize, forward=forward)
  if dq_from_blocks is None:
    dq_from_blocks = launch_config.selected_block_major(group)
  if fwd_from_blocks is None:
    fwd_from_blocks = launch_config.selected_block_major(group)
  st = _Static(block_size=block_size, window=window,
               scale=head_dim ** -0.5 if scale is None else float(scale),
               seq_len=seq_len, group=group, head_dim_v=v.shape[-1],
               dk_parts=tc.dot_parts(head_dim), launch=launch,
               segment=dkv_segment,
               interpret=tc.resolve_interpret(interpret),
               documents=doc_starts is not None, offset=shifted,
               dq_from_blocks=bool(dq_from_blocks),
               fwd_from_blocks=bool(fwd_from_blocks),
               fwd_chunks=launch_config.selected_chunks(
                   parts_bytes(v.shape[-1], True)),
               dq_chunks=launch_config.selected_chunks(
                   parts_bytes(head_dim, False)))
  if 0 in q.shape or 0 in v.shape:  # nothing to attend: no empty launch
    return jnp.zeros((batch, seq_len, num_heads, v.shape[-1]), q.dtype)
  block_indices = valid_block_indices(block_indices,
                                      -(-k.shape[1] // block_size))
  k, v, sees_bad = _non_finite_keys(k, v, block_indices, doc_starts,
                                    offset_arg, st)
  out = _selected_attention(q, k, v, block_indices, doc_starts, offset_arg,
                            st)
  sees_bad = jnp.repeat(sees_bad, group, axis=2)[..., None]  # [B, T, Hq, 1]
  return jnp.where(sees_bad, jnp.asarray(jnp.nan, out.dtype), out)
