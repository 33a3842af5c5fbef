"""SeerAttention-R on a GPU: the compiled oracle kernel and gated decode.

The oracle kernel (``pallas_kernels.attention_block_max``) against the XLA
path on float32 copies at full matmul precision: T off every block edge,
T < b, G 1 / 4 / 16, D 64 / 128, bf16 and fp32. Then one gated decode
attention step through the block-sparse decode kernel against XLA at 32k.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.seer import decode as decode_lib
from nsa_jax.seer import evaluate as eval_lib
from nsa_jax.seer import oracle
from nsa_jax.seer.config import SeerConfig
from nsa_jax.seer.config import Selection
from nsa_jax.seer.gate import AttnGate

SHAPES = [
    # (B, T, Hkv, G, D, b, dtype)
    (2, 4133, 2, 4, 128, 64, jnp.bfloat16),
    (1, 8192, 2, 16, 64, 64, jnp.bfloat16),
    (2, 2000, 4, 1, 128, 64, jnp.float32),
    (1, 50, 1, 4, 64, 64, jnp.bfloat16),  # T < b: nothing scored
]
IDS = [f"B{b}-T{t}-Hkv{h}-G{g}-D{d}-b{bs}-{jnp.dtype(x).name}"
       for b, t, h, g, d, bs, x in SHAPES]
# Relative-norm tolerance of the output; the target's entries are
# probabilities: an absolute tolerance.
RTOL = {jnp.float32: 2e-4, jnp.bfloat16: 2e-2}
ATOL_TARGET = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def _rel(got, want):
  got, want = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
               for x in (got, want))
  assert np.isfinite(got).all(), "non-finite values"
  return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


@pytest.mark.parametrize("b,t,hkv,g,d,bs,dtype", SHAPES, ids=IDS)
def test_compiled_oracle_equals_xla(b, t, hkv, g, d, bs, dtype):
  ks = jax.random.split(jax.random.key(0), 3)
  n = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(dtype)
  q, k, v = (n(ks[0], (b, t, hkv * g, d)), n(ks[1], (b, t, hkv, d)),
             n(ks[2], (b, t, hkv, d)))
  got_out, got = oracle.attention_oracle(q, k, v, block_size=bs,
                                         impl="pallas")
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    want_out, want = oracle.attention_oracle(f32(q), f32(k), f32(v),
                                             block_size=bs, impl="xla")
  assert _rel(got_out, want_out) < RTOL[dtype]
  diff = np.abs(np.asarray(got) - np.asarray(want))
  assert diff.max() < ATOL_TARGET[dtype], diff.max()
  sums = np.asarray(got).sum(-1)
  scored = np.arange(t) >= bs
  np.testing.assert_allclose(sums[:, scored], 1.0, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_decode_kernel_equals_xla(dtype):
  gate = AttnGate(32, 4, 128, SeerConfig(block_size=64, gate_dim=64),
                  rngs=nnx.Rngs(0))
  cache = eval_lib.random_cache(gate, 32768, 8, dtype)
  cache = cache.replace(lengths=jnp.arange(8, dtype=jnp.int32) * 997 + 25000)
  q = jax.random.normal(jax.random.key(1), (8, 1, 32, 128)).astype(dtype)
  selection = Selection(budget=2048)
  got, table = decode_lib.decode_attention(gate, q, q, cache, selection,
                                           impl="pallas")
  f32 = lambda x: x.astype(jnp.float32)
  cache32 = cache.replace(k=f32(cache.k), v=f32(cache.v))
  with jax.default_matmul_precision("highest"):
    want, want_table = decode_lib.decode_attention(
        gate, f32(q), f32(q), cache32, selection, impl="xla")
  np.testing.assert_array_equal(table, want_table)
  assert _rel(got, want) < RTOL[dtype]
