"""The block-max oracle: Pallas kernel (interpret) and XLA path vs reference.

The kernel's shape cases (interpret and GPU), query tiles and Triton lowering
are in tests/pallas_kernels/test_kernel_attention_block_max.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.seer import oracle
import pallas_kernels

# (B, T, Hkv, G, D, b, dtype): T off a block edge, T < b, T a block multiple,
# G 1 / 2 / 4, bf16 and fp32.
SHAPES = [
    (2, 50, 2, 2, 8, 16, jnp.float32),
    (1, 10, 2, 1, 16, 16, jnp.float32),  # T < b: no block is scored
    (1, 64, 1, 4, 16, 32, jnp.bfloat16),
]
IDS = [f"B{b}-T{t}-Hkv{h}-G{g}-D{d}-b{bs}-{jnp.dtype(x).name}"
       for b, t, h, g, d, bs, x in SHAPES]
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _inputs(b, t, hkv, g, d, dtype, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype)
  return make(b, t, hkv * g, d), make(b, t, hkv, d), make(b, t, hkv, d)


def _close(got, want, tol):
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize("b,t,hkv,g,d,bs,dtype", SHAPES, ids=IDS)
def test_xla_path_matches_dense_reference(b, t, hkv, g, d, bs, dtype):
  q, k, v = _inputs(b, t, hkv, g, d, dtype)
  out, target = oracle.attention_oracle(q, k, v, block_size=bs, impl="xla")
  want_out, want = oracle.attention_oracle(q, k, v, block_size=bs,
                                           impl="reference")
  assert target.shape == (b, t, hkv, -(-t // bs))
  assert target.dtype == jnp.float32 and out.dtype == dtype
  _close(out, want_out, TOL[dtype])
  # Probabilities are float32 on every path: float32 tolerance for both.
  _close(target, want, 2e-5 if dtype == jnp.float32 else 2e-3)
  sums = np.asarray(want).sum(-1)  # [B, T, Hkv]
  scored = np.arange(t) >= bs
  np.testing.assert_allclose(sums[:, scored], 1.0, rtol=1e-5)
  assert (sums[:, ~scored] == 0).all()
  blocks = np.arange(target.shape[-1])[None, :]
  later = blocks >= (np.arange(t) // bs)[:, None]  # own block and later
  assert (np.asarray(target).transpose(0, 2, 1, 3)[:, :, later] == 0).all()


def test_pallas_impl_runs_the_kernel():
  """impl="pallas" (interpret here) gives the reference's normalised target,
  here with T < b (nothing scored); the kernel's other shapes are in
  tests/pallas_kernels."""
  q, k, v = _inputs(1, 10, 2, 2, 16, jnp.float32)
  got = oracle.attention_oracle(q, k, v, block_size=16, impl="pallas")
  want = oracle.attention_oracle(q, k, v, block_size=16, impl="reference")
  _close(got[0], want[0], 2e-5)
  _close(got[1], want[1], 2e-5)


def test_reference_is_the_group_max_of_dense_probabilities():
  """One hand-checked row: query 40 of G = 2, blocks of 16."""
  q, k, v = _inputs(1, 41, 1, 2, 8, jnp.float32, seed=3)
  _, target = oracle.attention_oracle(q, k, v, block_size=16,
                                      impl="reference")
  s = np.einsum("hd,sd->hs", np.asarray(q)[0, 40], np.asarray(k)[0, :, 0])
  p = np.exp(s / np.sqrt(8))
  p /= p.sum(-1, keepdims=True)  # [G, 41]: every key is causal for t = 40
  raw = np.array([p[:, :16].max(), p[:, 16:32].max(), 0.0])
  np.testing.assert_allclose(target[0, 40, 0], raw / raw.sum(), rtol=1e-5)


def test_bad_input_raises_clear_errors():
  q, k, v = _inputs(1, 20, 2, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="block_size"):
    oracle.attention_oracle(q, k, v, block_size=0)
  with pytest.raises(ValueError, match="power-of-two block_size"):
    oracle.attention_oracle(q, k, v, block_size=24, impl="pallas")
  with pytest.raises(ValueError, match="multiple of kv heads"):
    oracle.attention_oracle(q[:, :, :3], k, v, block_size=16)
  with pytest.raises(ValueError, match="sequence length"):
    oracle.attention_oracle(q, k[:, :10], v[:, :10], block_size=16)
  with pytest.raises(ValueError, match="block_size"):
    pallas_kernels.attention_block_max(q, k, v, block_size=8)
  with pytest.raises(ValueError, match="impl"):
    oracle.attention_oracle(q, k, v, block_size=16, impl="cuda")
