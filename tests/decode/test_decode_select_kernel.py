"""The compressed decode kernel and the decode selection kernels.

Interpret mode against the XLA decode path (``nsa_jax.decode.attention``)
and ``selection.forced_top_n``, and their Triton lowering.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig
from nsa_jax import selection
from nsa_jax.decode import attention as attn_lib
from nsa_jax.decode import NSACache
from pallas_kernels import decode_attention
from pallas_kernels import decode_select

TINY = NSAConfig.tiny()  # l 8, d 4, l' 16: a = 4, b = 2
# l = l' = 16, d 4: a = b = 4, three tokens of the block before count too.
WIDE = dataclasses.replace(TINY, cmp_block=16, num_selected=5)
# l = d = 4 (no overlap): b = 1, no earlier block counts.
FLAT = dataclasses.replace(TINY, cmp_block=4)
TOL = dict(atol=2e-5, rtol=2e-5)


def _cache(config, lengths, hkv, dk, dv, max_length=120, seed=0):
  """Random NSACache; NaN/inf in every compressed slot no query sees."""
  cache = NSACache.create(len(lengths), max_length, config, hkv, dk, dv)
  ks = jax.random.split(jax.random.key(seed), 2)
  k_cmp = jax.random.normal(ks[0], cache.k_cmp.shape)
  v_cmp = jax.random.normal(ks[1], cache.v_cmp.shape)
  lengths = jnp.asarray(lengths, jnp.int32)
  i = jnp.arange(k_cmp.shape[1])[None, :, None, None]
  seen = i * config.cmp_stride + config.cmp_block <= lengths[:, None, None,
                                                              None]
  k_cmp = jnp.where(seen, k_cmp, jnp.nan)
  v_cmp = jnp.where(seen, v_cmp, jnp.inf)
  return cache.replace(k_cmp=k_cmp, v_cmp=v_cmp, lengths=lengths)


@functools.partial(jax.jit, static_argnames=("config",))
def _xla(q, cache, config):
  o, lse, positions, p_cmp = attn_lib.compressed_decode(
      q[:, None], cache.k_cmp, cache.v_cmp, cache.lengths, config)
  num_blocks = cache.k.shape[1] // config.sel_block
  table = attn_lib.select_decode_blocks(p_cmp, positions, config, num_blocks,
                                        cache.k.shape[2])
  return o[:, 0], lse[:, 0], table[:, 0]


@functools.partial(jax.jit, static_argnames=("config",))
def _kernels(q, cache, config):
  """Both kernels, as nsa_decode runs them, plus the raw outputs."""
  num_blocks = cache.k.shape[1] // config.sel_block
  blocks = dict(cmp_block=config.cmp_block, cmp_stride=config.cmp_stride)
  width = decode_select.scores_width(config.cmp_stride, config.sel_block,
                                     num_blocks, cache.k_cmp.shape[1])
  o, lse, scores = decode_attention.compressed_decode(
      q, cache.k_cmp, cache.v_cmp, cache.lengths, scores_width=width,
      num_splits=2, interpret=True, **blocks)
  select = functools.partial(
      decode_select.nsa_decode_select, lengths=cache.lengths,
      sel_block=config.sel_block, num_blocks=num_blocks,
      num_heads=q.shape[1], num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local,
      interpret=True, **blocks)
  # The selection also merges the splits' log-sum-exps itself.
  _, split_lse, _ = decode_attention.compressed_decode_parts(
      q, cache.k_cmp, cache.v_cmp, cache.lengths, scores_width=width,
      num_splits=2, interpret=True, **blocks)
  return o, lse, scores, select(scores, lse), select(scores, split_lse)


# (config, Hq, Hkv, Dk, Dv): G 1 / 2 / 4 / 16, Dk != Dv, b = 1, 2, 4.
CASES = [(TINY, 2, 2, 16, 8), (TINY, 16, 1, 8, 16), (WIDE, 8, 2, 16, 16),
         (FLAT, 4, 2, 16, 12)]


@pytest.mark.parametrize("config,hq,hkv,dk,dv", CASES)
def test_compressed_kernel_and_selection_equal_the_xla_path(config, hq, hkv,
                                                            dk, dv):
  # Rows: full cache, off block edges, one token short of the first
  # compressed token (sees none), a single visible token.
  lengths = [120, 37, config.cmp_block - 1, config.cmp_block]
  cache = _cache(config, lengths, hkv, dk, dv)
  q = jax.random.normal(jax.random.key(1), (4, hq, dk))
  o, lse, scores, table, table_from_splits = _kernels(q, cache, config)
  want_o, want_lse, want_table = _xla(q, cache, config)
  np.testing.assert_allclose(o, want_o, **TOL)
  group = hq // hkv
  lse = np.asarray(lse)[:, :, :group].reshape(4, hq)
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want_lse))
  np.testing.assert_allclose(np.where(np.isfinite(lse), lse, 0),
                             np.where(np.isfinite(lse), want_lse, 0), **TOL)
  np.testing.assert_array_equal(table, want_table)
  np.testing.assert_array_equal(table_from_splits, want_table)
  assert np.isneginf(lse[2]).all() and not np.asarray(o[2]).any()
  # The emitted scores of the visible tokens: scale * q.k * log2(e), for
  # G rows rounded up to a power of two (not the kernel's 16).
  assert scores.shape[2] == 1 << (group - 1).bit_length()
  t = np.asarray(cache.lengths) - 1
  for b in range(4):
    seen = max(0, (t[b] - config.cmp_block + 1) // config.cmp_stride + 1)
    qg = np.asarray(q[b]).reshape(hkv, group, dk)
    want = np.einsum("hgd,ihd->hgi", qg, np.asarray(cache.k_cmp[b, :seen]))
    got = np.asarray(scores[b, :, :group, :seen])
    np.testing.assert_allclose(got, want * dk ** -0.5 * np.log2(np.e),
                               **TOL)


def test_top_n_kernel_equals_forced_top_n():
  # Ties, -inf scores (never chosen unless forced), rows whose causal
  # blocks are fewer than the slots, and N not a power of two.
  ks = jax.random.split(jax.random.key(3), 2)
  scores = jnp.round(jax.random.uniform(ks[0], (4, 3, 11)) * 4) / 4
  scores = jnp.where(jax.random.uniform(ks[1], scores.shape) < 0.2,
                     -jnp.inf, scores)
  lengths = jnp.array([176, 40, 1, 100], jnp.int32)
  rule = dict(block_size=16, num_selected=6, num_initial=2, num_local=1)
  got = jax.jit(lambda s, n: decode_select.decode_top_n(
      s, n, interpret=True, **rule))(scores, lengths)
  want = selection.forced_top_n(scores[:, None], (lengths - 1)[:, None],
                                **rule)[:, 0]
  np.testing.assert_array_equal(got, want)


def test_scores_too_narrow_are_a_clear_error():
  cache = _cache(TINY, [120], 1, 16, 16)
  scores = jnp.zeros((1, 1, 16, 8), jnp.float32)
  with pytest.raises(ValueError, match="scores_width"):
    decode_select.nsa_decode_select(
        scores, jnp.zeros((1, 1, 16)), cache.lengths, cmp_block=8,
        cmp_stride=4, sel_block=16, num_blocks=8, num_heads=4,
        num_selected=4, num_initial=1, num_local=2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton(dtype):
  config = NSAConfig.paper()
  cache = NSACache.create(2, 4096, config, 2, 128, 128, dtype=dtype)
  q = jnp.zeros((2, 8, 128), dtype)
  num_blocks = cache.k.shape[1] // config.sel_block
  blocks = dict(cmp_block=config.cmp_block, cmp_stride=config.cmp_stride)
  width = decode_select.scores_width(config.cmp_stride, config.sel_block,
                                     num_blocks, cache.k_cmp.shape[1])

  def both(q, cache):
    _, lse, scores = decode_attention.compressed_decode_parts(
        q, cache.k_cmp, cache.v_cmp, cache.lengths, scores_width=width,
        interpret=False, **blocks)
    table = decode_select.nsa_decode_select(
        scores, lse, cache.lengths, sel_block=config.sel_block,
        num_blocks=num_blocks, num_heads=8, num_selected=16, num_initial=1,
        num_local=2, interpret=False, **blocks)
    return table, decode_select.decode_top_n(
        lse[:, :, 0], cache.lengths, block_size=64, num_selected=4,
        num_initial=1, num_local=1, interpret=False)

  text = jax.jit(both).trace(q, cache).lower(
      lowering_platforms=("cuda",)).as_text()
  for name in ("decode_with_scores", "nsa_decode_block_scores",
               "decode_top_n"):
    assert name in text
