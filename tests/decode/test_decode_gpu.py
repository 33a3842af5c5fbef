"""The compiled decode kernel against the XLA decode path, on a GPU.

Skipped without a GPU backend (as the tests/gpu suite); run on the GPU
machine with ``python -m pytest -q tests/decode/test_decode_gpu.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import decode
from nsa_jax import NSAConfig
from nsa_jax.benchmark import Shape
from nsa_jax.decode import attention as attn_lib
from nsa_jax.decode import benchmark as bench
import pallas_kernels
from pallas_kernels import decode_attention

pytestmark = pytest.mark.gpu
RTOL = {jnp.float32: 2e-4, jnp.bfloat16: 2e-2}


def _rel(got, want):
  got, want = (np.asarray(x, np.float32) for x in (got, want))
  return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b,size,hkv,group,d,n,block", [
    (2, 8192, 4, 16, 128, 16, 64), (16, 4096, 8, 4, 128, 16, 64),
    (1, 65536, 4, 16, 128, 64, 64)])
def test_compiled_kernel_equals_xla(b, size, hkv, group, d, n, block, dtype):
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, hkv * group, d)).astype(dtype)
  k = jax.random.normal(ks[1], (b, size, hkv, d)).astype(dtype)
  v = jax.random.normal(ks[2], (b, size, hkv, d)).astype(dtype)
  lengths = jax.random.randint(ks[3], (b,), size // 2, size + 1)
  rng = np.random.default_rng(0)
  table = np.stack([np.stack([rng.choice(size // block, n, replace=False)
                              for _ in range(hkv)]) for _ in range(b)])
  table[:, :, -2:] = -1
  table = jnp.asarray(table, jnp.int32)
  got, got_lse = pallas_kernels.block_sparse_decode(
      q, k, v, table, lengths, block_size=block)
  f32 = lambda x: x.astype(jnp.float32)
  want, want_lse = decode.block_sparse_decode(
      f32(q), f32(k), f32(v), table, lengths, block_size=block)
  assert _rel(got, want) < RTOL[dtype]
  finite = np.isfinite(np.asarray(want_lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(got_lse)), finite)
  assert _rel(np.asarray(got_lse)[finite], np.asarray(want_lse)[finite]) < (
      RTOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nsa_decode_pallas_equals_xla(dtype):
  config = NSAConfig.paper()
  shape = Shape(64, 4, 128, 128)
  cache = bench.random_nsa_cache(shape, 20000, config, 2, dtype)
  ks = jax.random.split(jax.random.key(1), 2)
  q = jax.random.normal(ks[0], (2, 1, 64, 128)).astype(dtype)
  gates = jax.nn.sigmoid(jax.random.normal(ks[1], (2, 1, 64, 3)))
  got = attn_lib.nsa_decode(q, gates, cache, config, impl="pallas")
  want = attn_lib.nsa_decode(q, gates, cache, config, impl="xla")
  assert _rel(got, want) < RTOL[dtype]


@pytest.mark.parametrize("batch,context", [(2, 65536), (16, 9000)])
def test_decode_selection_kernels_equal_xla(batch, context):
  # The compiled compressed-decode and selection kernels against XLA's
  # compressed_decode and top_n: same branch output, and the same blocks
  # up to near-ties (chosen blocks whose XLA scores agree to 1e-5).
  config = NSAConfig.paper()
  shape = Shape(64, 4, 128, 128)
  cache = bench.random_nsa_cache(shape, context, config, batch, jnp.float32)
  cache = cache.replace(lengths=jnp.linspace(context // 3, context, batch,
                                             dtype=jnp.int32))
  q = jax.random.normal(jax.random.key(2), (batch, 64, 128))
  (o, lse), table = jax.jit(lambda q, c: attn_lib._compressed_and_table(  # pylint: disable=protected-access
      q, c, config, None))(q, cache)
  o = decode_attention.merged(o, lse, 64, 128, q.dtype)[0]
  want_o, _, positions, p_cmp = attn_lib.compressed_decode(
      q[:, None], cache.k_cmp, cache.v_cmp, cache.lengths, config)
  assert _rel(o, want_o[:, 0]) < RTOL[jnp.float32]
  num_blocks = cache.k.shape[1] // config.sel_block
  want = attn_lib.select_decode_blocks(p_cmp, positions, config, num_blocks,
                                       4)[:, 0]
  from nsa_jax import selection  # pylint: disable=g-import-not-at-top
  scores = np.asarray(selection.compressed_to_selection_scores(
      p_cmp, config, num_blocks).reshape(batch, 4, 16, num_blocks).sum(2))
  table, want = np.asarray(table), np.asarray(want)
  for b, g in np.ndindex(batch, 4):
    got_set, want_set = set(table[b, g]), set(want[b, g])
    if got_set != want_set:
      total = lambda s: scores[b, g, [j for j in s if j >= 0]].sum()
      np.testing.assert_allclose(total(got_set), total(want_set), rtol=1e-5)


def test_decode_top_n_kernel_equals_forced_top_n():
  from nsa_jax import selection  # pylint: disable=g-import-not-at-top
  from pallas_kernels import decode_select  # pylint: disable=g-import-not-at-top
  scores = jax.random.uniform(jax.random.key(4), (16, 8, 1000))
  scores = jnp.where(scores < 0.1, -jnp.inf, jnp.round(scores * 64) / 64)
  lengths = jnp.linspace(1, 64000, 16, dtype=jnp.int32)
  rule = dict(block_size=64, num_selected=64, num_initial=1, num_local=1)
  got = decode_select.decode_top_n(scores, lengths, **rule)
  want = selection.forced_top_n(scores[:, None], (lengths - 1)[:, None],
                                **rule)[:, 0]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
