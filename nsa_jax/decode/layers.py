"""Prefill and decode steps of the attention layers and of TransformerLM.

Flax's cache convention (the gemma example): the cache is made by
``init_cache``, passed in and returned explicitly, never module state; so a
decode step is a pure function of (module, tokens, cache) that ``jax.jit``
compiles once. The modules' ``init_cache`` / ``prefill`` / ``decode_step``
methods delegate here.

``prefill`` runs a (right-padded) prompt through the training path
(``nsa_jax.ops.nsa_attention`` with the layer's ``impl``, or
``dense_attention.causal_attention``) and fills the cache; ``decode_step`` takes
the next Q tokens of every row (Q = 1, or a few for speculative decoding),
writes them to the cache, makes every compressed token they complete with
the layer's own ``BlockCompressor``, and attends (``nsa_jax.decode.
attention``). The output at position t equals the full-sequence forward at
t, within float tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import ops
from nsa_jax.data.token_ids import check_token_ids
from nsa_jax.decode import attention as attn_lib
from nsa_jax.decode import cache as cache_lib
from nsa_jax.modules import dense_attention
from nsa_jax.modules.rope import apply_rope


def _check_x(x, cache):
  if x.ndim != 3:
    raise ValueError(f"x must be [B, T, d_model], got {x.shape=}")
  if x.shape[0] != cache.lengths.shape[0]:
    raise ValueError(f"x has batch {x.shape[0]}, the cache "
                     f"{cache.lengths.shape[0]} rows (init_cache's batch)")


def _prompt_lengths(x, lengths):
  """int32 [B] prompt lengths, all T by default; concrete ones are checked."""
  b, t = x.shape[:2]
  if lengths is None:
    return jnp.full((b,), t, jnp.int32)
  lengths = jnp.asarray(lengths)
  if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be int [B] with B={b}, got "
                     f"{lengths.shape} {lengths.dtype}")
  known = cache_lib.concrete(lengths)
  if known is not None and ((known < 1) | (known > t)).any():
    raise ValueError(f"prompt lengths must lie in [1, T={t}], got "
                     f"{known.tolist()}")
  return lengths.astype(jnp.int32)


def _check_prefill_fits(t, cache):
  if t > cache.max_length:
    raise cache_lib.CacheOverflowError(
        f"cache overflow in prefill: a prompt of T={t} tokens exceeds "
        f"max_length={cache.max_length}; allocate a larger cache with "
        "init_cache")


def _dtype(linear):
  return linear.dtype or linear.param_dtype


# NSAAttention ---------------------------------------------------------------


def nsa_init_cache(layer, batch: int, max_length: int, *,
                   max_query_len: int = 1, dtype=None):
  """An empty NSACache for ``layer`` (an ``NSAAttention``).

  Args:
    layer: the NSAAttention.
    batch: B. max_length: most tokens a row holds (prompt and generated).
    max_query_len: most tokens one decode step takes.
    dtype: of keys/values, default the layer's compute dtype.
  """
  return cache_lib.NSACache.create(
      batch, max_length, layer.config, layer.num_kv_heads, layer.head_dim,
      layer.v_head_dim, shared_kv=layer.shared_kv,
      max_query_len=max_query_len,
      dtype=dtype or _dtype(layer.q_proj))


def _nsa_projections(layer, x, positions):
  """q [B,T,Hq,Dk], gates [B,T,Hq,3] and the K/V of each branch set."""
  b, t, _ = x.shape
  q = layer.q_proj(x).reshape(b, t, layer.num_heads, layer.head_dim)
  q = apply_rope(q, positions, layer.rope_base)
  gates = jax.nn.sigmoid(layer.gate_proj(x).reshape(b, t, layer.num_heads, 3))
  # pylint: disable=protected-access
  kv = {name: layer._kv(x, name, positions) for name in ("cmp", "slc", "win")}
  return q, gates, kv


def nsa_prefill(layer, x, cache: cache_lib.NSACache, lengths=None):
  """A prompt through the training ops, filling the cache from position 0.

  Args:
    layer: the NSAAttention.
    x: [B, T, d_model], rows right-padded; row b's prompt is its first
      ``lengths[b]`` positions (padding never reaches a valid position:
      attention is causal).
    cache: an NSACache from ``nsa_init_cache`` (its content is replaced).
    lengths: int [B] in [1, T], default T.

  Returns:
    (out [B, T, d_model], cache holding the prompts).

  Raises:
    CacheOverflowError: T > max_length.
  """
  _check_x(x, cache)
  b, t, _ = x.shape
  _check_prefill_fits(t, cache)
  lengths = _prompt_lengths(x, lengths)
  q, gates, kv = _nsa_projections(layer, x, jnp.arange(t))
  (k_cr, v_cr), (k, v), (k_win, v_win) = kv["cmp"], kv["slc"], kv["win"]
  k_cmp, v_cmp = layer.compress_k(k_cr), layer.compress_v(v_cr)
  out = ops.nsa_attention(q, k, v, gates, layer.config, k_cmp=k_cmp,
                          v_cmp=v_cmp, k_win=k_win, v_win=v_win,
                          impl=layer.impl)
  out = layer.out_proj(out.reshape(b, t, layer.num_heads * layer.v_head_dim))
  put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
      buf, new.astype(buf.dtype), 0, axis=1)
  updates = dict(k=put(cache.k, k), v=put(cache.v, v),
                 k_cmp=put(cache.k_cmp, k_cmp), v_cmp=put(cache.v_cmp, v_cmp),
                 lengths=lengths)
  if not cache.shared_kv:
    updates.update(
        k_win=cache_lib.fill_ring(cache.k_win, k_win, lengths),
        v_win=cache_lib.fill_ring(cache.v_win, v_win, lengths),
        k_cmp_raw=cache_lib.fill_ring(cache.k_cmp_raw, k_cr, lengths),
        v_cmp_raw=cache_lib.fill_ring(cache.v_cmp_raw, v_cr, lengths))
  return out, cache.replace(**updates)


def _new_compressed(compressor, source, positions, config, ring):
  """Compressed tokens completed at ``positions``, by the layer's phi.

  Args:
    compressor: the layer's BlockCompressor.
    source: [B, S, Hkv, D] raw keys or values (a ring when ``ring``).
    positions: int32 [B, Q] positions just written.
    config: NSA hyper-parameters.
    ring: ``source`` is a ring buffer.

  Returns:
    (tokens [B, Q, Hkv, D], index int32 [B, Q]): the compressed token
    completed at each position and its index, -1 where none completes.
  """
  b, nq = positions.shape
  l, d = config.cmp_block, config.cmp_stride
  start = positions + 1 - l  # [B, Q]
  block = start[:, :, None] + jnp.arange(l)  # [B, Q, l]
  raw = cache_lib.read(source, block.reshape(b, nq * l), ring=ring)
  raw = raw.reshape(b * nq, l, *source.shape[2:])  # [B*Q, l, Hkv, D]
  tokens = compressor(raw).reshape(b, nq, *source.shape[2:])
  done = (start >= 0) & (jnp.mod(start, d) == 0)
  return tokens, jnp.where(done, start // d, -1)


def nsa_decode_step(layer, x, cache: cache_lib.NSACache):
  """The next Q tokens of every row: write them, then attend.

  Args:
    layer: the NSAAttention.
    x: [B, Q, d_model], tokens at positions ``lengths .. lengths + Q - 1``.
    cache: the layer's NSACache.

  Returns:
    (out [B, Q, d_model], cache holding the Q new tokens).

  Raises:
    CacheOverflowError: a concrete row would pass max_length.
    ValueError: Q > the cache's max_query_len.
  """
  _check_x(x, cache)
  b, nq, _ = x.shape
  if nq > cache.max_query_len:
    raise ValueError(f"decode_step got {nq} tokens per row, the cache was "
                     f"made for max_query_len={cache.max_query_len}")
  cache_lib.check_capacity(cache.lengths, nq, cache.max_length, "decode_step")
  positions = cache.lengths[:, None] + jnp.arange(nq, dtype=jnp.int32)
  q, gates, kv = _nsa_projections(layer, x, positions)
  (k_cr, v_cr), (k, v), (k_win, v_win) = kv["cmp"], kv["slc"], kv["win"]
  new = dict(k=cache_lib.write(cache.k, k, positions),
             v=cache_lib.write(cache.v, v, positions),
             lengths=cache.lengths + nq)
  if cache.shared_kv:
    k_src, v_src, ring = new["k"], new["v"], False
  else:
    new.update(
        k_win=cache_lib.write(cache.k_win, k_win, positions, ring=True),
        v_win=cache_lib.write(cache.v_win, v_win, positions, ring=True),
        k_cmp_raw=cache_lib.write(cache.k_cmp_raw, k_cr, positions, ring=True),
        v_cmp_raw=cache_lib.write(cache.v_cmp_raw, v_cr, positions, ring=True))
    k_src, v_src, ring = new["k_cmp_raw"], new["v_cmp_raw"], True
  tc = cache.k_cmp.shape[1]
  if tc:
    k_new, index = _new_compressed(layer.compress_k, k_src, positions,
                                   layer.config, ring)
    v_new, _ = _new_compressed(layer.compress_v, v_src, positions,
                               layer.config, ring)
    index = jnp.where(index >= 0, index, tc)  # out of range: dropped
    new.update(k_cmp=cache_lib.write(cache.k_cmp, k_new, index),
               v_cmp=cache_lib.write(cache.v_cmp, v_new, index))
  cache = cache.replace(**new)
  out = attn_lib.nsa_decode(q, gates, cache, layer.config, impl=layer.impl)
  out = layer.out_proj(out.reshape(b, nq, layer.num_heads * layer.v_head_dim))
  return out, cache


# FullAttention --------------------------------------------------------------


def full_init_cache(layer, batch: int, max_length: int, *, dtype=None):
  """An empty FullCache for ``layer`` (a ``FullAttention``)."""
  return cache_lib.FullCache.create(
      batch, max_length, layer.num_kv_heads, layer.head_dim,
      dtype=dtype or _dtype(layer.q_proj))


def full_qkv(layer, x):
  """A FullAttention's projections before RoPE.

  Args:
    layer: the FullAttention.
    x: [B, T, d_model].

  Returns:
    (q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D]).
  """
  b, t, _ = x.shape
  shape = lambda h: (b, t, h, layer.head_dim)
  return (layer.q_proj(x).reshape(shape(layer.num_heads)),
          layer.k_proj(x).reshape(shape(layer.num_kv_heads)),
          layer.v_proj(x).reshape(shape(layer.num_kv_heads)))


def _full_projections(layer, x, positions):
  q, k, v = full_qkv(layer, x)
  return (apply_rope(q, positions, layer.rope_base),
          apply_rope(k, positions, layer.rope_base), v)


def full_prefill(layer, x, cache: cache_lib.FullCache, lengths=None):
  """A prompt through the layer's dense attention, filling the cache.

  The attention is the forward's (``dense_attention.causal_attention`` with
  the layer's implementation): cuDNN's flash attention on a GPU where it
  serves, never a ``T x T`` matrix there.

  Args, Returns, Raises: as ``nsa_prefill``.
  """
  _check_x(x, cache)
  b, t, _ = x.shape
  _check_prefill_fits(t, cache)
  lengths = _prompt_lengths(x, lengths)
  q, k, v = _full_projections(layer, x, jnp.arange(t))
  out = dense_attention.causal_attention(q, k, v,
                                         implementation=layer.implementation)
  out = layer.out_proj(out.reshape(b, t, layer.num_heads * layer.head_dim))
  put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
      buf, new.astype(buf.dtype), 0, axis=1)
  return out, cache.replace(k=put(cache.k, k), v=put(cache.v, v),
                            lengths=lengths)


def full_decode_step(layer, x, cache: cache_lib.FullCache):
  """The next Q tokens of every row, dense; as ``nsa_decode_step``."""
  _check_x(x, cache)
  b, nq, _ = x.shape
  cache_lib.check_capacity(cache.lengths, nq, cache.max_length, "decode_step")
  positions = cache.lengths[:, None] + jnp.arange(nq, dtype=jnp.int32)
  q, k, v = _full_projections(layer, x, positions)
  cache = cache.replace(k=cache_lib.write(cache.k, k, positions),
                        v=cache_lib.write(cache.v, v, positions),
                        lengths=cache.lengths + nq)
  out = attn_lib.full_decode(q, cache)
  out = layer.out_proj(out.reshape(b, nq, layer.num_heads * layer.head_dim))
  return out, cache


# TransformerLM --------------------------------------------------------------


def lm_init_cache(model, batch: int, max_length: int, *,
                  max_query_len: int = 1):
  """One cache per layer (a tuple), in the model's compute dtype."""
  return tuple(layer.attn.init_cache(batch, max_length,
                                     max_query_len=max_query_len)
               for layer in model.layers)


def _check_tokens(model, tokens):
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be int [B, T], got {tokens.shape} "
                     f"{tokens.dtype}")
  known = cache_lib.concrete(tokens)
  if known is not None:
    check_token_ids(known, model.config.vocab_size)


def _check_caches(model, caches):
  if not isinstance(caches, (tuple, list)) or len(caches) != len(
      model.layers):
    raise ValueError(f"cache must hold one entry per layer "
                     f"({len(model.layers)}), from init_cache")


def run_layers(model, tokens, states, attend):
  """The model's blocks with each attention call replaced by ``attend``.

  Args:
    model: the TransformerLM.
    tokens: int [B, T].
    states: one entry per layer (a decode cache, or anything ``attend``
      takes, None included).
    attend: ``attend(index, attn, x, state) -> (out [B, T, d_model],
      new state)`` for layer ``index``, its attention module and its
      normalised input ``x``.

  Returns:
    (float32 logits [B, T, vocab], tuple of the layers' new states).
  """
  _check_tokens(model, tokens)
  _check_caches(model, states)
  x = model._embed(tokens)  # pylint: disable=protected-access
  new_states = []
  for index, (layer, state) in enumerate(zip(model.layers, states)):
    h, state = attend(index, layer.attn, layer.attn_norm(x), state)
    x = x + h
    x = x + layer.mlp(layer.mlp_norm(x))
    new_states.append(state)
  return model.head(x), tuple(new_states)


def lm_prefill(model, tokens, caches, lengths=None):
  """A prompt through every layer, filling the caches.

  Args:
    model: the TransformerLM.
    tokens: int [B, T], right-padded prompts (padding ids must be in the
      vocabulary).
    caches: from ``lm_init_cache``.
    lengths: int [B] in [1, T], default T.

  Returns:
    (float32 logits [B, T, vocab] (row b's next-token logits are at
    ``lengths[b] - 1``), caches).
  """
  return run_layers(model, tokens, caches,
                    lambda _, attn, x, cache: attn.prefill(x, cache, lengths))


def lm_decode_step(model, tokens, caches):
  """The next Q tokens of every row through every layer.

  Args:
    model: the TransformerLM.
    tokens: int [B, Q].
    caches: from ``lm_prefill`` or an earlier step.

  Returns:
    (float32 logits [B, Q, vocab], caches).
  """
  return run_layers(model, tokens, caches,
                    lambda _, attn, x, cache: attn.decode_step(x, cache))
