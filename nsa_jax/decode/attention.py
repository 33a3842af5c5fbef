"""Decode-time attention math in XLA: NSA's branches over a cache, dense decode.

Every function takes the Q newest tokens of each row as queries (Q = 1 for
plain decoding, a few for speculative decoding) against keys already written
to a cache. Query ``j`` of row ``b`` sits at position ``lengths[b] - Q + j``
(``query_positions``): the cache holds every token up to the last query.
A key that no query of its row may see is masked in the scores and its value
is zeroed, so garbage in the cache (past a row's length, unused ring slots,
compressed tokens not yet complete) contributes exactly nothing, even NaN or
inf. Softmax statistics and block scores are float32 (float64 for float64
inputs), as in ``nsa_jax.xla``.
"""

from __future__ import annotations

import jax.numpy as jnp

from nsa_jax import selection
from nsa_jax.config import NSAConfig
from nsa_jax.decode import cache as cache_lib
from nsa_jax.xla import accum_dtype
from nsa_jax.xla import masked_softmax


def query_positions(lengths, num_queries: int):
  """int32 [B, Q]: positions ``lengths - Q + j`` of a step's Q queries."""
  j = jnp.arange(num_queries, dtype=jnp.int32)
  return lengths.astype(jnp.int32)[:, None] - num_queries + j


def _scale(q, scale):
  return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _group(q, num_kv_heads):
  """[B, Q, Hq, D] -> [B, Q, Hkv, G, D]."""
  b, n, hq, d = q.shape
  return q.reshape(b, n, num_kv_heads, hq // num_kv_heads, d)


def _ungroup(x):
  """[B, Q, Hkv, G, ...] -> [B, Q, Hq, ...]."""
  return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], *x.shape[4:])


def _zero_where_not(x, keep):
  """x with entries zeroed (not multiplied) where ``keep`` is False."""
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


def attend_by_position(q, k, v, key_pos, positions, *, scale=None,
                       window: int | None = None):
  """Attention of each query over shared keys whose positions are given.

  Query at position t sees key s iff ``0 <= key_pos[s] <= t`` (and
  ``key_pos[s] > t - window`` when ``window`` is set).

  Args:
    q: [B, Q, Hq, Dk].
    k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv].
    key_pos: int32 [B, S], the position of each key; negative: no key.
    positions: int32 [B, Q] query positions.
    scale: default 1/sqrt(Dk).
    window: optional w.

  Returns:
    (out [B, Q, Hq, Dv] in q.dtype, lse [B, Q, Hq] float32,
    scores [B, Q, Hkv, G, S] float32 (scaled q.k), mask [B, Q, 1, 1, S]).
  """
  acc = accum_dtype(q)
  hkv = k.shape[2]
  t = positions[:, :, None]  # [B, Q, 1]
  kp = key_pos[:, None, :]  # [B, 1, S]
  mask = (kp >= 0) & (kp <= t)
  if window is not None:
    mask &= kp > t - window
  # Values no query of the row can see are zeroed: garbage stays out.
  seen = (key_pos >= 0) & (key_pos <= positions.max(axis=1, keepdims=True))
  v = _zero_where_not(v, seen[:, :, None, None])
  s = jnp.einsum("bqhgd,bshd->bqhgs", _group(q, hkv), k,
                 preferred_element_type=acc) * _scale(q, scale)
  mask = mask[:, :, None, None, :]
  p, lse = masked_softmax(s, mask)
  out = jnp.einsum("bqhgs,bshd->bqhgd", p.astype(v.dtype), v,
                   preferred_element_type=acc)
  return _ungroup(out).astype(q.dtype), _ungroup(lse), s, mask


def block_sparse_decode(q, k, v, block_table, lengths, *, block_size: int,
                        scale=None):
  """Attention over the keys of a block table: the general block-sparse decode.

  Query at position t (``query_positions``) of kv head g reads keys
  ``s <= t`` of the blocks ``block_table[b, q, g]`` (block j = keys
  ``[j*block_size, (j+1)*block_size)``); -1 marks an empty slot. Any table
  works (NSA's top-n, SeerAttention-R's gated blocks, ...); a repeated block
  would be counted twice, so tables must not repeat entries.

  Args:
    q: [B, Hq, Dk] (one query per row) or [B, Q, Hq, Dk].
    k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv]; S a multiple of ``block_size``.
    block_table: int32 [B, Hkv, n] or [B, Q, Hkv, n] (matching q), entries
      in [0, S / block_size) or -1.
    lengths: int32 [B], tokens in the cache of each row (queries included).
    block_size: keys per block.
    scale: default 1/sqrt(Dk).

  Returns:
    (out [B, (Q,) Hq, Dv] in q.dtype, lse [B, (Q,) Hq] float32); a query with
    no visible key gets out = 0 and lse = -inf.

  Raises:
    ValueError: shapes that do not fit.
  """
  single = q.ndim == 3
  if single:
    q, block_table = q[:, None], block_table[:, None]
  b, nq, hq, dk = q.shape
  _, size, hkv, dv = v.shape
  if k.shape[:3] != (b, size, hkv) or k.shape[3] != dk or hq % hkv:
    raise ValueError(f"{q.shape=}, {k.shape=} and {v.shape=} do not fit "
                     "(batch, cache length, GQA heads or Dk)")
  if size % block_size:
    raise ValueError(f"cache length {size} must be a multiple of "
                     f"{block_size=}")
  if block_table.ndim != 4 or block_table.shape[:3] != (b, nq, hkv):
    raise ValueError(f"{block_table.shape=} must be [B, (Q,) Hkv, n] for "
                     f"{q.shape=} and {k.shape=}")
  if lengths.shape != (b,):
    raise ValueError(f"{lengths.shape=} must be [B] with B={b}")
  acc = accum_dtype(q)
  num_blocks = size // block_size
  table = block_table.astype(jnp.int32)  # [B, Q, Hkv, n]
  safe = jnp.clip(table, 0, num_blocks - 1)
  rows = jnp.arange(b)[:, None, None, None]
  heads = jnp.arange(hkv)[None, None, :, None]
  # [B, Ts, l', Hkv, D] indexed at (b, block, :, g) -> [B, Q, Hkv, n, l', D].
  kk = k.reshape(b, num_blocks, block_size, hkv, dk)[rows, safe, :, heads]
  vv = v.reshape(b, num_blocks, block_size, hkv, dv)[rows, safe, :, heads]
  n = table.shape[-1]
  key_pos = table[..., None] * block_size + jnp.arange(block_size)
  t = query_positions(lengths, nq)[:, :, None, None, None]
  mask = (table[..., None] >= 0) & (key_pos <= t)  # [B, Q, Hkv, n, l']
  kk = kk.reshape(b, nq, hkv, n * block_size, dk)
  vv = _zero_where_not(vv, mask[..., None]).reshape(
      b, nq, hkv, n * block_size, dv)
  mask = mask.reshape(b, nq, hkv, 1, n * block_size)
  s = jnp.einsum("bqhgd,bqhsd->bqhgs", _group(q, hkv), kk,
                 preferred_element_type=acc) * _scale(q, scale)
  p, lse = masked_softmax(s, mask)
  out = jnp.einsum("bqhgs,bqhsd->bqhgd", p.astype(vv.dtype), vv,
                   preferred_element_type=acc)
  out, lse = _ungroup(out).astype(q.dtype), _ungroup(lse)
  if single:
    return out[:, 0], lse[:, 0]
  return out, lse


def compressed_decode(q, k_cmp, v_cmp, lengths, config: NSAConfig, *,
                      scale=None):
  """Branch 1 for a step's queries, and the importance branch 2 ranks.

  Query t sees compressed token i iff ``i*d + l - 1 <= t``. Its importance
  ``p_cmp = exp(s - lse)`` over visible tokens (reusing branch 1's lse, as
  ``nsa_jax.selection.block_scores`` does) feeds ``select_decode_blocks``.

  Args:
    q: [B, Q, Hq, Dk].
    k_cmp: [B, Tc, Hkv, Dk]; v_cmp: [B, Tc, Hkv, Dv] (the cache's).
    lengths: int32 [B], tokens in the cache (queries included).
    config: NSA hyper-parameters.
    scale: default 1/sqrt(Dk).

  Returns:
    (o_cmp [B, Q, Hq, Dv] in q.dtype, lse [B, Q, Hq] float32, positions
    int32 [B, Q] of the queries, p_cmp float32 [B, Q, Hq, Tc], the
    importance that ``select_decode_blocks`` ranks; 0 where not visible).
  """
  positions = query_positions(lengths, q.shape[1])
  b, tc, hkv, dv = v_cmp.shape
  # Token i becomes visible at position i*d + l - 1: that is its key position.
  key_pos = jnp.arange(tc, dtype=jnp.int32) * config.cmp_stride + (
      config.cmp_block - 1)
  key_pos = jnp.broadcast_to(key_pos, (b, tc))
  if tc == 0:
    out = jnp.zeros((*q.shape[:3], dv), q.dtype)
    lse = jnp.full(q.shape[:3], -jnp.inf, accum_dtype(q))
    p_cmp = jnp.zeros((*q.shape[:3], 0), jnp.float32)
  else:
    out, lse, s, mask = attend_by_position(q, k_cmp, v_cmp, key_pos,
                                           positions, scale=scale)
    lse_g = _group(lse[..., None], hkv)  # [B, Q, Hkv, G, 1]
    p_cmp = jnp.where(mask & jnp.isfinite(lse_g), jnp.exp(s - lse_g), 0.0)
    p_cmp = _ungroup(p_cmp.astype(jnp.float32))  # [B, Q, Hq, Tc]
  return out, lse, positions, p_cmp


def select_decode_blocks(p_cmp, positions, config: NSAConfig,
                         num_blocks: int, num_kv_heads: int):
  """Top-n selection blocks of each query from its compressed importance.

  Args:
    p_cmp: float32 [B, Q, Hq, Tc] branch-1 probabilities (0 where not seen).
    positions: int32 [B, Q] query positions.
    config: NSA hyper-parameters.
    num_blocks: Ts, selection blocks of the cache.
    num_kv_heads: Hkv.

  Returns:
    int32 [B, Q, Hkv, num_selected], entries in [0, Ts) or -1.
  """
  b, nq, hq, _ = p_cmp.shape
  p_slc = selection.compressed_to_selection_scores(p_cmp, config, num_blocks)
  scores = p_slc.reshape(b, nq, num_kv_heads, hq // num_kv_heads,
                         num_blocks).sum(axis=3)
  return selection.top_n_at(scores, positions, config)


def _pallas_step(impl: str, num_queries: int) -> bool:
  """Whether a step runs the Pallas decode kernels (one query a row)."""
  from nsa_jax import ops  # pylint: disable=g-import-not-at-top

  return ops.resolve_impl(impl) == "pallas" and num_queries == 1


def decode_top_n(scores, positions, *, block_size: int, num_selected: int,
                 num_initial: int, num_local: int, impl: str = "auto"):
  """``nsa_jax.selection.forced_top_n``, as a Pallas kernel for Q = 1.

  One-token steps on the "pallas" implementation ("auto" on a GPU) rank in
  ``pallas_kernels.decode_select.decode_top_n`` (XLA's top_k costs more
  than the attention read there); the others run ``forced_top_n``.

  Args:
    scores: float [B, Q, Hkv, N] block scores (-inf: only if forced).
    positions: int [B, Q] query positions.
    block_size, num_selected, num_initial, num_local: the rule.
    impl: "auto", "pallas", "xla" or "reference".

  Returns:
    int32 [B, Q, Hkv, num_selected].
  """
  rule = dict(block_size=block_size, num_selected=num_selected,
              num_initial=num_initial, num_local=num_local)
  if not _pallas_step(impl, scores.shape[1]):
    return selection.forced_top_n(scores, positions, **rule)
  from pallas_kernels import decode_select  # pylint: disable=g-import-not-at-top
  return decode_select.decode_top_n(scores[:, 0], positions[:, 0] + 1,
                                    **rule)[:, None]


def _compressed_and_table(q, cache: cache_lib.NSACache, config: NSAConfig,
                          scale):
  """Branch 1 of a one-token step, unmerged, and its block table.

  ``compressed_decode_parts`` attends the visible compressed tokens (split
  across programs) and writes their scores; ``nsa_decode_select`` merges
  the splits' log-sum-exps, turns the scores into block scores and ranks
  them: no ``[B, Hq, Tc]`` probabilities in XLA and no ``top_k``.

  Args:
    q: [B, Hq, Dk]. cache: NSACache with Tc >= 1. config: NSA settings.
    scale: or None.

  Returns:
    ((o float32 [B, Hkv, S, Gp, Dv_p], lse float32 [B, Hkv, S, Gp]), the
    branch's split partials, and table int32 [B, Hkv, n]).
  """
  from pallas_kernels import decode_attention  # pylint: disable=g-import-not-at-top
  from pallas_kernels import decode_select  # pylint: disable=g-import-not-at-top

  num_blocks = cache.k.shape[1] // config.sel_block
  blocks = dict(cmp_block=config.cmp_block, cmp_stride=config.cmp_stride)
  width = decode_select.scores_width(
      config.cmp_stride, config.sel_block, num_blocks,
      decode_attention.compressed_columns(cache.k_cmp.shape[1]))
  o, lse, scores = decode_attention.compressed_decode_parts(
      q, cache.k_cmp, cache.v_cmp, cache.lengths, scores_width=width,
      scale=scale, **blocks)
  table = decode_select.nsa_decode_select(
      scores, lse, cache.lengths, sel_block=config.sel_block,
      num_blocks=num_blocks, num_heads=q.shape[1],
      num_selected=config.num_selected, num_initial=config.num_initial,
      num_local=config.num_local, **blocks)
  return (o, lse), table


def _fused_step(q, gates, cache: cache_lib.NSACache, config: NSAConfig,
                scale):
  """A one-token NSA step in five Pallas launches.

  The compressed branch with its scores, the block scores, the top-n
  (``_compressed_and_table``), the selected and window branches in one
  block-sparse launch, then ``decode_merge.gated_merge``: every branch's
  splits merged and gated at once, no merge in XLA.

  Args:
    q: [B, Hq, Dk]. gates: [B, Hq, 3] (cmp, slc, win). cache: NSACache with
    Tc >= 1. config: NSA settings. scale: or None.

  Returns:
    [B, Hq, Dv] in q.dtype.
  """
  from pallas_kernels import decode_attention  # pylint: disable=g-import-not-at-top
  from pallas_kernels import decode_merge  # pylint: disable=g-import-not-at-top
  from pallas_kernels import triton_compat as tc  # pylint: disable=g-import-not-at-top

  cmp_parts, table = _compressed_and_table(q, cache, config, scale)
  o, lse, (num_slc, num_win) = decode_attention.block_sparse_decode_parts(
      q, _selected_and_window_sources(cache, table, config), cache.lengths,
      block_size=config.sel_block, scale=scale)
  b, hq, _ = q.shape
  hkv, num_cmp, group_p = o.shape[1], cmp_parts[0].shape[2], o.shape[3]
  # Rows padded as the partials' (Gp), columns to a power of two (4).
  gates = gates.reshape(b, hkv, hq // hkv, 3)
  gates = tc.pad_axis(tc.pad_axis(gates, 2, group_p), 3, 4)
  branches = [decode_merge.Branch(0, 0, num_cmp),
              decode_merge.Branch(1, 0, num_slc),
              decode_merge.Branch(1, num_slc, num_win)]
  out = decode_merge.gated_merge([cmp_parts, (o, lse)], branches, gates,
                                 dtype=q.dtype)
  dv = cache.v.shape[3]
  return out[:, :, :hq // hkv, :dv].reshape(b, hq, dv)


def _use_kernel(impl: str, num_queries: int, block_size: int) -> bool:
  """Whether the selected branch runs the Pallas decode kernel."""
  if not _pallas_step(impl, num_queries):
    return False
  supported = block_size >= 16 and not block_size & (block_size - 1)
  return supported or impl == "pallas"  # explicit: the kernel's own error


def _use_selection_kernels(impl: str, num_queries: int,
                           config: NSAConfig) -> bool:
  """Whether a one-token step runs ``_fused_step``."""
  if not _use_kernel(impl, num_queries, config.sel_block):
    return False
  a, rem = divmod(config.sel_block, config.cmp_stride)
  supported = (not rem and not config.cmp_block % config.cmp_stride
               and not a & (a - 1))
  return supported or impl == "pallas"  # explicit: the kernel's own error


def block_sparse_attend(q, k, v, block_table, lengths, *, block_size: int,
                        scale=None, impl: str = "auto"):
  """``block_sparse_decode`` of a step, through the Pallas kernel or XLA.

  One-token steps run ``pallas_kernels.block_sparse_decode`` when ``impl``
  is "pallas" (interpret mode without a GPU) or "auto" on a GPU with a
  power-of-two block >= 16; everything else runs the XLA
  ``block_sparse_decode``. NSA's selected branch and SeerAttention-R's
  gated blocks both read their caches through here.

  Args:
    q: [B, Q, Hq, Dk] queries at positions ``lengths - Q + j``.
    k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv]; S a multiple of ``block_size``.
    block_table: int [B, Q, Hkv, n], entries in [0, S / block_size) or -1,
      no repeats.
    lengths: int32 [B], tokens in the cache (queries included).
    block_size: keys per block.
    scale: default 1/sqrt(Dk).
    impl: "auto", "pallas", "xla" or "reference" (the last two: XLA).

  Returns:
    [B, Q, Hq, Dv] in q.dtype; 0 for a query that sees no key.
  """
  if _use_kernel(impl, q.shape[1], block_size):
    import pallas_kernels  # pylint: disable=g-import-not-at-top
    out, _ = pallas_kernels.block_sparse_decode(
        q[:, 0], k, v, block_table[:, 0], lengths, block_size=block_size,
        scale=scale)
    return out[:, None]
  return block_sparse_decode(q, k, v, block_table, lengths,
                             block_size=block_size, scale=scale)[0]


def _window_xla(q, cache, config: NSAConfig, positions, scale):
  """Branch 3 in XLA: the ring (own K/V) or the newest raw keys (shared).

  Args:
    q: [B, Q, Hq, Dk]. cache: NSACache. config: NSA settings.
    positions: int32 [B, Q] query positions. scale: or None.

  Returns:
    [B, Q, Hq, Dv].
  """
  lengths = cache.lengths
  if cache.shared_kv:
    # The window reads the raw cache: gather the newest w + Q - 1 positions.
    span = min(config.window + q.shape[1] - 1, cache.k.shape[1])
    win_pos = (lengths - 1)[:, None] - jnp.arange(span, dtype=jnp.int32)
    k_win = cache_lib.read(cache.k, win_pos)
    v_win = cache_lib.read(cache.v, win_pos)
    win_pos = jnp.where(win_pos >= 0, win_pos, -1)
  else:
    k_win, v_win = cache.k_win, cache.v_win
    win_pos = cache_lib.ring_positions(lengths, k_win.shape[1])
  return attend_by_position(q, k_win, v_win, win_pos, positions, scale=scale,
                            window=config.window)[0]


def _window_source(cache, config: NSAConfig):
  """Branch 3 as a ``decode_attention.Source``: own K/V, every block of the
  ring (``ring=True``); shared K/V, the blocks of the raw cache that hold
  positions ``(t - w, t]``."""
  from pallas_kernels import decode_attention  # pylint: disable=g-import-not-at-top

  bs, w = config.sel_block, config.window
  b, hkv = cache.lengths.shape[0], cache.k.shape[2]
  if cache.shared_kv:
    k, v, ring = cache.k, cache.v, False
    t = cache.lengths - 1
    first = jnp.maximum(t - w + 1, 0) // bs  # [B]
    count = min(-(-w // bs) + 1, k.shape[1] // bs)
    blocks = first[:, None] + jnp.arange(count)  # [B, count]
    blocks = jnp.where(blocks <= (t // bs)[:, None], blocks, -1)
  else:
    k, v, ring = cache.k_win, cache.v_win, True
    num = k.shape[1] // bs
    blocks = jnp.broadcast_to(jnp.arange(num), (b, num))
  window = jnp.broadcast_to(blocks[:, None], (b, hkv, blocks.shape[1]))
  return decode_attention.Source(k, v, window.astype(jnp.int32), w, ring)


def _selected_and_window_sources(cache, table, config: NSAConfig):
  """Branches 2 and 3 as the two sources of one block-sparse launch: the
  selected blocks ``table`` [B, Hkv, n] of the raw cache, and
  ``_window_source``."""
  from pallas_kernels import decode_attention  # pylint: disable=g-import-not-at-top

  return [decode_attention.Source(cache.k, cache.v, table),
          _window_source(cache, config)]


def _selected_and_window_kernel(q, cache, table, config: NSAConfig, scale):
  """Branches 2 and 3 of a one-token step: one block-sparse decode launch
  (``block_sparse_decode_many``) over ``_selected_and_window_sources``.

  Args:
    q: [B, Hq, Dk]. cache: NSACache. table: int32 [B, Hkv, n], the
    selection. config: NSA settings. scale: or None.

  Returns:
    (o_slc, o_win), each [B, Hq, Dv].
  """
  from pallas_kernels import decode_attention  # pylint: disable=g-import-not-at-top

  (o_slc, _), (o_win, _) = decode_attention.block_sparse_decode_many(
      q, _selected_and_window_sources(cache, table, config), cache.lengths,
      block_size=config.sel_block, scale=scale)
  return o_slc, o_win


def nsa_decode(q, gates, cache: cache_lib.NSACache, config: NSAConfig, *,
               scale=None, impl: str = "auto"):
  """NSA output of a step's queries against a cache that already holds them.

  Args:
    q: [B, Q, Hq, Dk] queries at positions ``lengths - Q + j``.
    gates: [B, Q, Hq, 3] in [0, 1], order (cmp, slc, win).
    cache: the layer's cache after this step's tokens were written
      (``nsa_jax.decode.layers`` writes them, new compressed tokens
      included).
    config: NSA hyper-parameters.
    scale: default 1/sqrt(Dk).
    impl: "pallas" runs a one-token step as Pallas kernels (interpret mode
      without a GPU, ``_fused_step``): the compressed branch with its
      scores, the block scores and top-n, the selected and window branches
      in one block-sparse decode launch, and one launch that merges and
      gates them; "auto" does so on a GPU when l' is a power of two >= 16
      and l'/d a power of two (with only l' so, the selected and window
      branches alone run as a kernel); otherwise (and for several tokens a
      step) everything is XLA. "xla" and "reference" are the XLA path.

  Returns:
    [B, Q, Hq, Dv] in q.dtype; NaN for rows past ``max_length``.
  """
  from nsa_jax import ops  # pylint: disable=g-import-not-at-top

  nq, hkv = q.shape[1], cache.k.shape[2]
  if nq > cache.max_query_len:
    raise ValueError(f"{nq} queries in one step, the cache was made for "
                     f"max_query_len={cache.max_query_len}")
  lengths = cache.lengths
  if _use_selection_kernels(impl, nq, config) and cache.k_cmp.shape[1]:
    out = _fused_step(q[:, 0], gates[:, 0], cache, config, scale)
    return poison_overflow(out[:, None], cache)
  o_cmp, _, positions, p_cmp = compressed_decode(
      q, cache.k_cmp, cache.v_cmp, lengths, config, scale=scale)
  num_blocks = cache.k.shape[1] // config.sel_block
  table = select_decode_blocks(p_cmp, positions, config, num_blocks, hkv)
  if _use_kernel(impl, nq, config.sel_block):
    o_slc, o_win = _selected_and_window_kernel(q[:, 0], cache, table[:, 0],
                                               config, scale)
    o_slc, o_win = o_slc[:, None], o_win[:, None]
  else:
    o_slc = block_sparse_decode(q, cache.k, cache.v, table, lengths,
                                block_size=config.sel_block, scale=scale)[0]
    o_win = _window_xla(q, cache, config, query_positions(lengths, nq),
                        scale)
  out = ops.combine_branches(gates, o_cmp, o_slc, o_win)
  return poison_overflow(out, cache)


def full_decode(q, cache: cache_lib.FullCache, *, scale=None):
  """Dense causal attention of a step's queries over a cache holding them.

  Args:
    q: [B, Q, Hq, D] queries at positions ``lengths - Q + j``.
    cache: FullCache after this step's keys/values were written.
    scale: default 1/sqrt(D).

  Returns:
    [B, Q, Hq, D] in q.dtype; NaN for rows past ``max_length``.
  """
  b, size = cache.k.shape[:2]
  positions = query_positions(cache.lengths, q.shape[1])
  key_pos = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (b, size))
  out = attend_by_position(q, cache.k, cache.v, key_pos, positions,
                           scale=scale)[0]
  return poison_overflow(out, cache)


def poison_overflow(out, cache):
  """NaN for the rows of ``out`` [B, ...] whose cache overflowed under jit."""
  bad = cache.overflowed().reshape((-1,) + (1,) * (out.ndim - 1))
  return jnp.where(bad, jnp.asarray(jnp.nan, out.dtype), out)
