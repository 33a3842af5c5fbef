"""Branch 2's block choice: Eq. 9 importance scores, top-n selection in XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import chunking
from nsa_jax import segments
from nsa_jax.config import NSAConfig


def compressed_to_selection_scores(p_cmp, config: NSAConfig, num_sel: int):
  """Maps compressed-token scores to selection blocks (Eq. 9, 0-based).

  ``p_slc[.., j] = sum_{m<a} sum_{n<b} p_cmp[.., j*a + m - n]`` with
  ``a = l'/d``, ``b = l/d``; indices outside ``[0, Tc)`` are dropped.

  Args:
    p_cmp: float32 [..., Tc] compressed-token probabilities.
    config: the block sizes.
    num_sel: Ts, number of selection blocks.

  Returns:
    float32 [..., Ts].
  """
  a = config.sel_block // config.cmp_stride
  b = config.cmp_block // config.cmp_stride
  num_chunks = num_sel * a
  tc = p_cmp.shape[-1]
  # chunk_score[k] = sum_{n<b} p_cmp[k - n]: the b compressed blocks covering
  # stride-chunk k. Pad b-1 zeros in front, enough behind for every chunk.
  pad_back = max(0, num_chunks - tc)
  padded = jnp.pad(p_cmp, [(0, 0)] * (p_cmp.ndim - 1) + [(b - 1, pad_back)])
  chunk_score = sum(
      padded[..., b - 1 - n: b - 1 - n + num_chunks] for n in range(b))
  return chunk_score.reshape(*p_cmp.shape[:-1], num_sel, a).sum(axis=-1)


def _scores_chunk(q, k_cmp, lse, starts, t0, config, scale, num_sel):
  """Group-summed block scores for one chunk of queries.

  Args:
    q: [B, C, Hq, Dk] queries at positions t0 .. t0 + C - 1.
    k_cmp: [B, Tc, Hkv, Dk].
    lse: [B, C, Hq] branch-1 log-sum-exp of those queries.
    starts: int32 [B, C] document starts of those queries, or None.

  Returns:
    float32 [B, C, Hkv, Ts].
  """
  b, c, hq, dk = q.shape
  tc, hkv = k_cmp.shape[1], k_cmp.shape[2]
  group = hq // hkv
  qg = q.reshape(b, c, hkv, group, dk)
  s = jnp.einsum("bcgrd,bigd->bcgri", qg, k_cmp,
                 preferred_element_type=jnp.float32) * scale
  t = t0 + jnp.arange(c)[:, None]
  i = jnp.arange(tc)[None, :]
  visible = (i * config.cmp_stride + config.cmp_block - 1 <= t)[None]
  if starts is not None:  # the whole block in the query's document
    visible &= i * config.cmp_stride >= starts[..., None]
  visible = visible[:, :, None, None, :]
  lse = lse.reshape(b, c, hkv, group, 1)
  p = jnp.where(visible & jnp.isfinite(lse), jnp.exp(s - lse), 0.0)
  p_slc = compressed_to_selection_scores(p, config, num_sel)
  return p_slc.sum(axis=3)


def block_scores(q, k_cmp, lse, config: NSAConfig, *, scale=None,
                 segment_ids=None, chunk_size: int = 128, q_offset=0,
                 seq_len: int | None = None):
  """Group-summed importance P of every selection block, chunked over queries.

  Never holds more than one chunk's ``[B, C, Hq, Tc]`` probabilities.

  Args:
    q: [B, T, Hq, Dk]; k_cmp: [B, Tc, Hkv, Dk]; lse: float32 [B, T, Hq].
    config: block sizes.
    scale: defaults to 1/sqrt(Dk).
    segment_ids: optional int [B, T]: a compressed token scores for a query
      only if its whole block lies in the query's document.
    chunk_size: queries per chunk.
    q_offset: position of q's first row (an int or a traced int32 scalar),
      for queries that are a slice of a longer sequence (context
      parallelism); k_cmp then holds that sequence's compressed tokens.
    seq_len: length of that sequence, which sets Ts; default T.

  Returns:
    float32 [B, T, Hkv, Ts], before forcing and causal masking.

  Raises:
    ValueError: ``segment_ids`` with a query slice (``q_offset`` other than
      the int 0): documents are defined on the whole sequence.
  """
  segments.check_whole_sequence(segment_ids, q_offset)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  num_sel = config.num_selection_blocks(
      q.shape[1] if seq_len is None else seq_len)
  if k_cmp.shape[1] == 0:
    return jnp.zeros((q.shape[0], q.shape[1], k_cmp.shape[2], num_sel),
                     jnp.float32)

  def body(q_chunk, lse_chunk, starts_chunk, t0):
    return _scores_chunk(q_chunk, k_cmp, lse_chunk, starts_chunk,
                         q_offset + t0, config,
                         scale, num_sel)

  return chunking.map_query_chunks(
      body, (q, lse, segments.starts_or_none(segment_ids)), chunk_size)


def select_blocks(q, k_cmp, lse, *, config: NSAConfig, scale=None,
                  segment_ids=None):
  """XLA block selection: ``block_scores`` ranked by ``top_n_blocks``."""
  scores = block_scores(q, k_cmp, lse, config, scale=scale,
                        segment_ids=segment_ids)
  return top_n_blocks(scores, config, segment_ids=segment_ids)


def top_n_blocks(scores, config: NSAConfig, *, segment_ids=None):
  """Picks ``num_selected`` blocks per (query, kv head) by the spec's rules.

  Forced blocks (the first ``num_initial`` of the query's document and the
  ``num_local`` ending at the query's own block) rank first, then the other
  candidate blocks by score, ties to the lower index; slots beyond the number
  of candidates hold -1. See ``top_n_at``.

  Args:
    scores: float32 [B, T, Hkv, Ts] group-summed importance.
    config: selection settings.
    segment_ids: optional int [B, T].

  Returns:
    int32 [B, T, Hkv, num_selected], no repeats.
  """
  batch, seq_len = scores.shape[:2]
  positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
  return top_n_at(scores, positions, config,
                  starts=segments.starts_or_none(segment_ids))


def top_n_at(scores, positions, config: NSAConfig, *, starts=None):
  """``top_n_blocks`` for queries at given positions (decoding uses this).

  The candidates of a query at t are the blocks ``f .. t // l'``, where
  ``f = starts // l'`` is the block holding its document's first position
  (0 without ``starts``). Forced: ``f .. f + num_initial - 1`` and the
  ``num_local`` blocks ending at ``t // l'``, as far as they are candidates.
  They rank first, then the other candidates by score, ties to the lower
  index; spare slots hold -1.

  Args:
    scores: float32 [B, Q, Hkv, Ts] group-summed importance.
    positions: int [B, Q] query positions.
    config: selection settings.
    starts: optional int [B, Q]: first position of each query's document.

  Returns:
    int32 [B, Q, Hkv, num_selected], no repeats.
  """
  return forced_top_n(scores, positions, block_size=config.sel_block,
                      num_selected=config.num_selected,
                      num_initial=config.num_initial,
                      num_local=config.num_local, starts=starts)


def forced_top_n(scores, positions, *, block_size: int, num_selected: int,
                 num_initial: int, num_local: int, starts=None):
  """The top-n rule of NSA's selection, for any block scores.

  SeerAttention-R's budget selection is this rule with one initial and one
  local block (block 0 and the query's own block). A score of -inf marks a
  block that must not be chosen unless it is forced.

  Args:
    scores: float [B, Q, Hkv, Ts] block scores.
    positions: int [B, Q] query positions.
    block_size: keys per block.
    num_selected: slots per (query, kv head), forced blocks included.
    num_initial: forced leading blocks.
    num_local: forced blocks ending at the query's own block ``t //
      block_size``.
    starts: optional int [B, Q]: first position of each query's document;
      its block ``f`` replaces block 0 as the first candidate (see
      ``top_n_at``).

  Returns:
    int32 [B, Q, Hkv, num_selected]: forced blocks first, then the other
    causal blocks by score (ties to the lower index), -1 in spare slots; no
    repeats.
  """
  num_sel = scores.shape[-1]
  own = (positions // block_size)[:, :, None, None]  # [B, Q, 1, 1]
  j = jnp.arange(num_sel)
  first = 0 if starts is None else (starts // block_size)[:, :, None, None]
  causal = (j <= own) & (j >= first)
  forced = causal & ((j < first + num_initial) | (j > own - num_local))
  ranked = jnp.where(forced, jnp.inf, jnp.where(causal, scores, -jnp.inf))
  n = num_selected
  if num_sel < n:
    ranked = jnp.pad(ranked, [(0, 0)] * 3 + [(0, n - num_sel)],
                     constant_values=-jnp.inf)
  values, indices = jax.lax.top_k(ranked, n)
  return jnp.where(values > -jnp.inf, indices, -1).astype(jnp.int32)
