"""Dense, masked, float32 NSA: the oracle every other path is tested against.

Everything here builds full ``[.., T, S]`` score matrices and boolean masks, so
it is only for small shapes. Each function states its mask in one line; the
shared ``masked_attention`` does the softmax. With ``segment_ids`` (int
[B, T]; a document is a run of equal ids, ``nsa_jax.segments``) every mask
also requires each raw key a query reads, directly or inside a compressed
token, to lie in the query's document.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import segments
from nsa_jax.config import NSAConfig
from nsa_jax.selection import top_n_blocks


def masked_attention(q, k, v, mask, scale):
  """Softmax attention with a boolean mask, float32 throughout.

  Args:
    q: [B, T, Hq, Dk].
    k: [B, S, Hkv, Dk] with Hq a multiple of Hkv (query head h reads h // G).
    v: [B, S, Hkv, Dv].
    mask: bool, broadcastable to [B, T, Hq, S]; True where q may see k.
    scale: softmax scale.

  Returns:
    (out [B, T, Hq, Dv] in q.dtype, lse [B, T, Hq] float32, float64 for
    float64 q). Rows that see no key give out = 0 and lse = -inf, with finite
    gradients. A key the mask hides contributes nothing whatever its k and v
    (NaN and inf included); a row that sees a key whose k or v holds a
    non-finite entry gets a NaN output.
  """
  acc = jnp.promote_types(q.dtype, jnp.float32)
  group = q.shape[2] // k.shape[2]
  bad = ~(jnp.isfinite(k).all(-1) & jnp.isfinite(v).all(-1))  # [B, S, Hkv]
  k = jnp.where(bad[..., None], 0, k)
  v = jnp.where(bad[..., None], 0, v)
  k = jnp.repeat(k.astype(acc), group, axis=2)
  v = jnp.repeat(v.astype(acc), group, axis=2)
  s = jnp.einsum("bthd,bshd->bths", q.astype(acc), k) * scale
  mask = jnp.broadcast_to(mask, s.shape)
  bad = jnp.repeat(bad, group, axis=2).transpose(0, 2, 1)  # [B, Hq, S]
  sees_bad = (mask & bad[:, None]).any(-1)  # [B, T, Hq]
  s = jnp.where(mask, s, -jnp.inf)
  m = jax.lax.stop_gradient(
      jnp.max(s, axis=-1, keepdims=True, initial=-jnp.inf))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  seen = denom > 0
  out = jnp.einsum("bths,bshd->bthd", p, v) / jnp.where(seen, denom, 1.0)
  out = jnp.where(sees_bad[..., None], jnp.nan, out)
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
  return out.astype(q.dtype), lse[..., 0]


def _default_scale(q, scale):
  return q.shape[-1] ** -0.5 if scale is None else scale


def same_document(segment_ids):
  """bool [B, T, 1, T]: key s lies in query t's document (None: True)."""
  if segment_ids is None:
    return True
  doc = segments.document_index(segment_ids)
  return (doc[:, :, None] == doc[:, None, :])[:, :, None, :]


def compressed_visible(seq_len, num_cmp, block_size, stride,
                       segment_ids=None, q_offset=0):
  """bool [B or 1, T, 1, Tc]: query t sees compressed token i.

  Iff the token's block ``[i*d, i*d + l)`` is in t's past
  (``i*d + l - 1 <= t``) and, with segment ids, each of its ``l`` keys is in
  t's document. Row r is query t = q_offset + r.
  """
  segments.check_whole_sequence(segment_ids, q_offset)
  t = q_offset + jnp.arange(seq_len)[:, None]
  i = jnp.arange(num_cmp)[None, :]
  visible = (i * stride + block_size - 1 <= t)[None, :, None, :]
  if segment_ids is None:
    return visible
  doc = segments.document_index(segment_ids)  # [B, T]
  covered = i.T * stride + jnp.arange(block_size)  # [Tc, l] key positions
  whole = (doc[:, covered][:, None] == doc[:, :, None, None]).all(-1)
  return visible & whole[:, :, None, :]  # whole: [B, T, Tc]


def compressed_attention_reference(q, k_cmp, v_cmp, *, block_size, stride,
                                   scale=None, segment_ids=None, q_offset=0):
  """Branch 1 over the tokens ``compressed_visible`` lets each query see.

  Args:
    q: [B, T, Hq, Dk]; k_cmp: [B, Tc, Hkv, Dk]; v_cmp: [B, Tc, Hkv, Dv].
    block_size: l. stride: d. scale: defaults to 1/sqrt(Dk).
    segment_ids: optional int [B, T].
    q_offset: position of q's first row (an int or an int scalar array);
      k_cmp may then hold the tokens of a longer sequence.

  Returns:
    (out [B, T, Hq, Dv], lse [B, T, Hq] float32, -inf where nothing is seen).
  """
  visible = compressed_visible(q.shape[1], k_cmp.shape[1], block_size, stride,
                               segment_ids, q_offset)
  return masked_attention(q, k_cmp, v_cmp, visible, _default_scale(q, scale))


def selected_block_mask(block_indices, seq_len, block_size, q_offset=0):
  """Dense mask of the selected, causal keys.

  Args:
    block_indices: int [B, T, Hkv, n]; entries outside [0, Ts) are empty
      (no key matches them), a repeated entry counts once.
    seq_len: S, number of keys.
    block_size: l'.
    q_offset: key position of the first query row: row r is t = q_offset + r.

  Returns:
    bool [B, T, Hkv, S]: key s is in a selected block of (t, g) and s <= t.
  """
  s = jnp.arange(seq_len)
  t = q_offset + jnp.arange(block_indices.shape[1])
  idx = block_indices.astype(jnp.promote_types(block_indices.dtype,
                                               jnp.int32))
  in_block = (idx[..., None] == (s // block_size)).any(axis=-2)
  return in_block & (s[None, :] <= t[:, None])[None, :, None, :]


def selected_attention_reference(q, k, v, block_indices, *, block_size,
                                 scale=None, segment_ids=None, q_offset=0):
  """Branch 2: attention over the keys s <= t of the selected blocks.

  Args:
    q: [B, T, Hq, Dk]; k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv], S = T unless
      ``q_offset`` places the queries inside a longer key sequence.
    block_indices: int [B, T, Hkv, n], -1 for an empty slot.
    block_size: l'.
    segment_ids: optional int [B, T]: keys outside t's document are masked.
    q_offset: key position of q's first row (an int or an int scalar
      array): row r is query t = q_offset + r.

  Returns:
    [B, T, Hq, Dv].
  """
  segments.check_whole_sequence(segment_ids, q_offset)
  group = q.shape[2] // k.shape[2]
  mask = selected_block_mask(block_indices, k.shape[1], block_size, q_offset)
  mask = jnp.repeat(mask, group, axis=2) & same_document(segment_ids)
  return masked_attention(q, k, v, mask, _default_scale(q, scale))[0]


def sliding_window_attention_reference(q, k, v, *, window, scale=None,
                                       segment_ids=None):
  """Branch 3: query t sees keys s with t - w < s <= t (in its document).

  Args:
    q: [B, T, Hq, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv]. window: w.
    segment_ids: optional int [B, T].

  Returns:
    [B, T, Hq, Dv].
  """
  t = jnp.arange(q.shape[1])[:, None]
  s = jnp.arange(k.shape[1])[None, :]
  mask = ((s <= t) & (s > t - window))[None, :, None, :]
  mask = mask & same_document(segment_ids)
  return masked_attention(q, k, v, mask, _default_scale(q, scale))[0]


def block_scores_reference(q, k_cmp, lse, config: NSAConfig, *, scale=None,
                           segment_ids=None):
  """Group-summed selection-block importance P, by the literal Eq. 9 sum.

  Args:
    q: [B, T, Hq, Dk]; k_cmp: [B, Tc, Hkv, Dk]; lse: [B, T, Hq] from branch 1.
    segment_ids: optional int [B, T]: only the compressed tokens branch 1
      lets a query see score (``compressed_visible``).

  Returns:
    float32 [B, T, Hkv, Ts], P[t, g, j] before forcing or causal masking.
  """
  b, seq_len, hq, _ = q.shape
  tc, hkv = k_cmp.shape[1], k_cmp.shape[2]
  scale = _default_scale(q, scale)
  l, d, lsel = config.cmp_block, config.cmp_stride, config.sel_block
  k_rep = jnp.repeat(k_cmp.astype(jnp.float32), hq // hkv, axis=2)
  s = jnp.einsum("bthd,bihd->bthi", q.astype(jnp.float32), k_rep) * scale
  visible = compressed_visible(seq_len, tc, l, d, segment_ids)
  p_cmp = jnp.where(visible, jnp.exp(s - lse[..., None]), 0.0)
  a, bb = lsel // d, l // d
  num_sel = config.num_selection_blocks(seq_len)
  columns = []
  for j in range(num_sel):
    total = jnp.zeros((b, seq_len, hq), jnp.float32)
    for m in range(a):
      for n in range(bb):
        idx = j * a + m - n
        if 0 <= idx < tc:
          total = total + p_cmp[..., idx]
    columns.append(total)
  p_slc = jnp.stack(columns, axis=-1)  # [B, T, Hq, Ts]
  return p_slc.reshape(b, seq_len, hkv, hq // hkv, num_sel).sum(axis=3)


def select_blocks_reference(q, k_cmp, lse, config: NSAConfig, *, scale=None,
                            segment_ids=None):
  """Top-n selection by the spec's rules, one query at a time in numpy order.

  The candidates of query t are the blocks ``f .. t // l'``, f the block
  holding the first position of t's document (0 without segment ids).
  Forced blocks (``f .. f + num_initial - 1``, and the ``num_local`` ending
  at t // l', all candidates) come first, then the other candidates by
  descending P, ties to the lower index; spare slots are -1.

  Returns:
    int32 [B, T, Hkv, num_selected].
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  scores = np.asarray(jax.jit(  # one compilation, not many eager ops
      block_scores_reference, static_argnums=3, static_argnames="scale")(
          q, k_cmp, lse, config, scale=scale, segment_ids=segment_ids))
  b, seq_len, hkv, _ = scores.shape
  n = config.num_selected
  starts = np.zeros((b, seq_len), np.int64)
  if segment_ids is not None:
    doc = np.asarray(segments.document_index(segment_ids))
    for bi in range(b):
      for t in range(seq_len):
        starts[bi, t] = np.flatnonzero(doc[bi] == doc[bi, t])[0]
  out = np.full((b, seq_len, hkv, n), -1, np.int32)
  for t in range(seq_len):
    own = t // config.sel_block
    for bi in range(b):
      first = starts[bi, t] // config.sel_block
      forced = [j for j in range(first, first + config.num_initial)
                if j <= own]
      forced += [j for j in range(own, own - config.num_local, -1)
                 if j >= first and j not in forced]
      rest = [j for j in range(first, own + 1) if j not in forced]
      for g in range(hkv):
        ranked = sorted(rest, key=lambda j: (-scores[bi, t, g, j], j))
        chosen = (forced + ranked)[:n]
        out[bi, t, g, :len(chosen)] = chosen
  return jnp.asarray(out)


def nsa_attention_reference(q, k, v, gates, config: NSAConfig, *, k_cmp, v_cmp,
                            k_win=None, v_win=None, scale=None,
                            segment_ids=None):
  """Gated sum of the three reference branches, jit-able.

  Blocks are ranked from the dense ``block_scores_reference`` and picked by the
  shared ``top_n_blocks`` (``select_blocks_reference`` checks that rule).

  Returns:
    [B, T, Hq, Dv].
  """
  o_cmp, lse = compressed_attention_reference(
      q, k_cmp, v_cmp, block_size=config.cmp_block, stride=config.cmp_stride,
      scale=scale, segment_ids=segment_ids)
  scores = block_scores_reference(
      jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_cmp),
      jax.lax.stop_gradient(lse), config, scale=scale,
      segment_ids=segment_ids)
  indices = top_n_blocks(scores, config, segment_ids=segment_ids)
  o_slc = selected_attention_reference(q, k, v, indices,
                                       block_size=config.sel_block, scale=scale,
                                       segment_ids=segment_ids)
  k_win = k if k_win is None else k_win
  v_win = v if v_win is None else v_win
  o_win = sliding_window_attention_reference(q, k_win, v_win,
                                             window=config.window, scale=scale,
                                             segment_ids=segment_ids)
  acc = jnp.promote_types(q.dtype, jnp.float32)
  gates = gates.astype(acc)
  out = (gates[..., 0:1] * o_cmp.astype(acc)
         + gates[..., 1:2] * o_slc.astype(acc)
         + gates[..., 2:3] * o_win.astype(acc))
  return out.astype(q.dtype)
