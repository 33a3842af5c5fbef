"""NSA branches in plain XLA with bounded memory: the CPU/TPU path and fallback.

No function here builds a ``T x T`` matrix. Each maps over chunks of C query
positions (``chunking.map_query_chunks``) and, per chunk, attends to:
  compressed  all Tc compressed tokens, masked block-causally  [C, Tc]
  selected    the n selected blocks of each query, gathered    [C, n * l']
  window      the C + w - 1 keys that end at the chunk          [C, C + w - 1]
Softmax statistics are float32 (float64 for float64 inputs, so finite
differences can check gradients); matmuls take the input dtype and accumulate
in that precision. A key that a query cannot see contributes nothing to it
whatever its k and v (NaN and inf included: rows holding them are zeroed
before any product, as 0 * inf is NaN); a query that sees such a key gets a
NaN output, as on every path. With ``segment_ids`` every mask also needs the
keys in the query's document: ``s >= starts[t]``, the document's first
position (``nsa_jax.segments``), for a raw key and for every key of a
compressed token's block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import chunking
from nsa_jax import segments


def masked_softmax(s, mask):
  """Softmax over the last axis of the entries where ``mask`` holds.

  Args:
    s: float32 [..., S] scores.
    mask: bool broadcastable to ``s``.

  Returns:
    (p [..., S] float32, lse [...] float32). Rows with no visible entry give
    p = 0 and lse = -inf, with zero (not NaN) gradients.
  """
  s = jnp.where(mask, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  seen = denom > 0
  safe = jnp.where(seen, denom, 1.0)
  lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)
  return p / safe, lse[..., 0]


def finite_keys(k, v):
  """Zeroes the key positions whose k or v row holds a non-finite entry.

  Args:
    k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv].

  Returns:
    (k, v with those rows zeroed, bool [B, S, Hkv]: True for them).
  """
  bad = ~(jnp.isfinite(k).all(-1) & jnp.isfinite(v).all(-1))
  zero = lambda x: jnp.where(bad[..., None], jnp.zeros((), x.dtype), x)
  return zero(k), zero(v), bad


def poison(out, sees_bad):
  """NaN rows where a query saw a non-finite key or value."""
  return jnp.where(sees_bad[..., None], jnp.nan, out)


def valid_block_indices(block_indices, num_blocks):
  """Empty (-1) for slots outside [0, num_blocks) and for repeated slots.

  Args:
    block_indices: int [..., n].
    num_blocks: Ts.

  Returns:
    int32 [..., n]: each block named at most once per row.
  """
  idx = block_indices
  if idx.dtype.itemsize < 4:  # num_blocks may not fit a narrow type
    idx = idx.astype(jnp.int32)
  idx = jnp.where((idx >= 0) & (idx < num_blocks), idx, -1).astype(jnp.int32)
  n = idx.shape[-1]
  earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]  # [n, n]
  repeat = jnp.any((idx[..., :, None] == idx[..., None, :]) & earlier, -1)
  return jnp.where(repeat, -1, idx)


def accum_dtype(x):
  """float32, or float64 when x is float64."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _group(q, num_kv_heads):
  """[B, C, Hq, D] -> [B, C, Hkv, G, D]: query head h reads kv head h // G."""
  b, c, hq, d = q.shape
  return q.reshape(b, c, num_kv_heads, hq // num_kv_heads, d)


def _ungroup(x):
  """[B, C, Hkv, G, ...] -> [B, C, Hq, ...]."""
  return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3],
                   *x.shape[4:])


def compressed_attention(q, k_cmp, v_cmp, *, block_size, stride, scale,
                         segment_ids=None, chunk_size=128, q_offset=0):
  """Branch 1: query t sees compressed token i iff i*d + l - 1 <= t.

  With segment ids also ``i*d >= starts[t]``: the token's whole block lies in
  t's document.

  Args:
    q: [B, T, Hq, Dk]; k_cmp: [B, Tc, Hkv, Dk]; v_cmp: [B, Tc, Hkv, Dv].
    block_size: l. stride: d. scale: softmax scale.
    segment_ids: optional int [B, T].
    chunk_size: queries per chunk.
    q_offset: position of q's first row (an int or a traced int32 scalar):
      row r is query t = q_offset + r, and k_cmp may hold the compressed
      tokens of a longer sequence (context parallelism: one shard's queries
      against every compressed token).

  Returns:
    (out [B, T, Hq, Dv] in q.dtype, lse [B, T, Hq] float32).
  """
  segments.check_whole_sequence(segment_ids, q_offset)
  b, seq_len, hq, _ = q.shape
  tc, hkv, dv = k_cmp.shape[1], k_cmp.shape[2], v_cmp.shape[3]
  acc = accum_dtype(q)
  if tc == 0:
    out = jnp.zeros((b, seq_len, hq, dv), q.dtype)
    return out, jnp.full((b, seq_len, hq), -jnp.inf, accum_dtype(q))
  first_visible = jnp.arange(tc) * stride + block_size - 1  # [Tc]
  k_cmp, v_cmp, bad = finite_keys(k_cmp, v_cmp)
  bad = bad.transpose(0, 2, 1)[:, None, :, None, :]  # [B, 1, Hkv, 1, Tc]

  def body(q_chunk, starts, t0):
    qg = _group(q_chunk, hkv)  # [B, C, Hkv, G, Dk]
    s = jnp.einsum("bcgrd,bigd->bcgri", qg, k_cmp,
                   preferred_element_type=acc) * scale
    t = q_offset + t0 + jnp.arange(q_chunk.shape[1])
    mask = (first_visible[None, :] <= t[:, None])[None]  # [1, C, Tc]
    if starts is not None:
      mask = mask & (jnp.arange(tc) * stride >= starts[..., None])
    mask = mask[:, :, None, None, :]
    p, lse = masked_softmax(s, mask)
    out = jnp.einsum("bcgri,bigd->bcgrd", p.astype(v_cmp.dtype), v_cmp,
                     preferred_element_type=acc)
    out = poison(out, (mask & bad).any(-1))
    return _ungroup(out).astype(q.dtype), _ungroup(lse)

  return chunking.map_query_chunks(
      body, (q, segments.starts_or_none(segment_ids)), chunk_size)


def selected_attention(q, k, v, block_indices, *, block_size, scale,
                       segment_ids=None, chunk_size=64, q_offset=0):
  """Branch 2: each query attends to keys s <= t of its selected blocks.

  The n selected blocks of every (query, kv head) are gathered whole from a
  ``[B, Hkv, Ts, l', D]`` view of k and v; the gather's transpose (a
  scatter-add) gives dK and dV.

  Args:
    q: [B, T, Hq, Dk]; k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv], S = T unless
      ``q_offset`` places the queries inside a longer key sequence.
    block_indices: int [B, T, Hkv, n]; -1 and any entry outside
      [0, ceil(S / l')) is an empty slot, a repeated entry counts once.
    block_size: l'. scale: softmax scale.
    segment_ids: optional int [B, T]: keys outside the query's document are
      masked.
    chunk_size: queries per chunk.
    q_offset: position of q's first row among the keys (an int or a traced
      int32 scalar): row r is query t = q_offset + r (context parallelism).

  Returns:
    [B, T, Hq, Dv] in q.dtype.
  """
  b, seq_len, hkv, dk = k.shape
  segments.check_whole_sequence(segment_ids, q_offset)
  dv = v.shape[3]
  acc = accum_dtype(q)
  num_sel = -(-seq_len // block_size)
  pad = num_sel * block_size - seq_len

  def blocks(x):  # [B, T, Hkv, D] -> [B, Hkv, Ts, l', D]
    x = jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)])
    x = x.reshape(b, num_sel, block_size, hkv, x.shape[-1])
    return x.transpose(0, 3, 1, 2, 4)

  k, v, bad = finite_keys(k, v)
  k_blocks, v_blocks = blocks(k), blocks(v)
  bad_blocks = blocks(bad[..., None])[..., 0]  # [B, Hkv, Ts, l']
  offsets = jnp.arange(block_size)
  block_indices = valid_block_indices(block_indices, num_sel)

  def body(q_chunk, idx_chunk, starts, t0):
    c, n = q_chunk.shape[1], idx_chunk.shape[-1]
    idx = idx_chunk.transpose(0, 2, 1, 3)  # [B, Hkv, C, n]
    flat = jnp.clip(idx, 0, num_sel - 1).reshape(b, hkv, c * n)
    take = lambda x: jnp.take_along_axis(
        x, flat[:, :, :, None, None], axis=2, mode="clip")
    kk = take(k_blocks).reshape(b, hkv, c, n * block_size, dk)
    vv = take(v_blocks).reshape(b, hkv, c, n * block_size, dv)
    bb = jnp.take_along_axis(bad_blocks, flat[:, :, :, None], axis=2,
                             mode="clip").reshape(b, hkv, c, 1, n * block_size)
    pos = idx[..., None] * block_size + offsets  # [B, Hkv, C, n, l']
    t = (q_offset + t0 + jnp.arange(c))[None, None, :, None, None]
    mask = (idx[..., None] >= 0) & (pos <= t)
    if starts is not None:
      mask = mask & (pos >= starts[:, None, :, None, None])
    mask = mask.reshape(b, hkv, c, 1, n * block_size)
    qg = _group(q_chunk, hkv).transpose(0, 2, 1, 3, 4)  # [B, Hkv, C, G, Dk]
    s = jnp.einsum("bgcrd,bgcsd->bgcrs", qg, kk,
                   preferred_element_type=acc) * scale
    p, _ = masked_softmax(s, mask)
    out = jnp.einsum("bgcrs,bgcsd->bgcrd", p.astype(vv.dtype), vv,
                     preferred_element_type=acc)
    out = poison(out, (mask & bb).any(-1))
    return _ungroup(out.transpose(0, 2, 1, 3, 4)).astype(q.dtype)

  return chunking.map_query_chunks(
      body, (q, block_indices, segments.starts_or_none(segment_ids)),
      chunk_size, pad_values=(0, -1, 0))


def sliding_window_attention(q, k, v, *, window, scale, segment_ids=None,
                             chunk_size=128):
  """Branch 3: query t sees keys s with t - w < s <= t (and s >= starts[t]).

  A chunk of C queries starting at t0 reads the ``C + W - 1`` keys from
  ``t0 - W + 1`` (W = min(w, T)), a dynamic slice of k padded in front.

  Args:
    q: [B, T, Hq, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv].
    window: w. scale: softmax scale.
    segment_ids: optional int [B, T].
    chunk_size: queries per chunk.

  Returns:
    [B, T, Hq, Dv] in q.dtype.
  """
  seq_len, hkv = k.shape[1], k.shape[2]
  acc = accum_dtype(q)
  span_back = min(window, seq_len) - 1
  chunk, count = chunking.num_chunks(seq_len, chunk_size)
  pads = [(0, 0), (span_back, chunk * count - seq_len), (0, 0), (0, 0)]
  k, v, bad = finite_keys(k, v)
  k_pad, v_pad = jnp.pad(k, pads), jnp.pad(v, pads)
  bad_pad = jnp.pad(bad, pads[:3])
  span = chunk + span_back

  def body(q_chunk, starts, t0):
    kk = jax.lax.dynamic_slice_in_dim(k_pad, t0, span, axis=1)
    vv = jax.lax.dynamic_slice_in_dim(v_pad, t0, span, axis=1)
    qg = _group(q_chunk, hkv)  # [B, C, Hkv, G, Dk]
    s = jnp.einsum("bcgrd,bsgd->bcgrs", qg, kk,
                   preferred_element_type=acc) * scale
    t = t0 + jnp.arange(q_chunk.shape[1])[:, None]
    pos = t0 - span_back + jnp.arange(span)[None, :]
    mask = ((pos <= t) & (pos > t - window) & (pos >= 0))[None]  # [1, C, S]
    if starts is not None:
      mask = mask & (pos >= starts[..., None])
    mask = mask[:, :, None, None, :]
    p, _ = masked_softmax(s, mask)
    out = jnp.einsum("bcgrs,bsgd->bcgrd", p.astype(vv.dtype), vv,
                     preferred_element_type=acc)
    bb = jax.lax.dynamic_slice_in_dim(bad_pad, t0, span, axis=1)  # [B,S,Hkv]
    out = poison(out, (mask & bb.transpose(0, 2, 1)[:, None, :, None, :]
                       ).any(-1))
    return _ungroup(out).astype(q.dtype)

  return chunking.map_query_chunks(
      body, (q, segments.starts_or_none(segment_ids)), chunk)
