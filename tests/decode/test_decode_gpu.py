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
