"""attention_block_max (SeerAttention-R's oracle kernel) vs the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.seer.oracle import attention_oracle_reference
from pallas_kernels import attention_block_max

import kernel_test_utils as u

# (B, T, Hkv, G, D, b, block_q, dtype): T off a block edge with G 3 (padded
# to 4), D 8 (padded to 16) and a non-default tile; T a block multiple with
# G 16 in bf16. T < b runs in tests/seer/test_seer_oracle.py.
CASES = [
    (2, 37, 2, 3, 8, 16, 8, jnp.float32),
    (1, 64, 1, 16, 16, 32, None, jnp.bfloat16),
]


def _inputs(b, t, hkv, g, d, dtype, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype)
  return make(b, t, hkv * g, d), make(b, t, hkv, d), make(b, t, hkv, d)


class AttentionBlockMaxCases:
  """The kernel's tests; subclasses say whether they run interpreted."""

  INTERPRET = True

  @pytest.mark.parametrize("b,t,hkv,g,d,bs,block_q,dtype", CASES)
  def test_matches_reference(self, b, t, hkv, g, d, bs, block_q, dtype):
    q, k, v = _inputs(b, t, hkv, g, d, dtype)
    out, block_max = attention_block_max(q, k, v, block_size=bs,
                                         block_q=block_q,
                                         interpret=self.INTERPRET)
    want_out, want = attention_oracle_reference(q, k, v, block_size=bs)
    assert block_max.shape == want.shape and block_max.dtype == jnp.float32
    u.assert_close(out, want_out, dtype)
    u.assert_close(block_max, want, jnp.float32 if dtype == jnp.float32
                   else jnp.float16)  # probabilities of bf16 dots


class TestAttentionBlockMaxInterpret(AttentionBlockMaxCases):
  INTERPRET = True


@pytest.mark.gpu
class TestAttentionBlockMaxGpu(AttentionBlockMaxCases):
  INTERPRET = False


@pytest.mark.lowering
@pytest.mark.parametrize("g,d,bs,dtype", [
    (1, 128, 64, jnp.bfloat16), (4, 64, 64, jnp.float32),
    (16, 128, 64, jnp.bfloat16), (2, 24, 16, jnp.float16)])
def test_lowers_to_triton(g, d, bs, dtype):
  q, k, v = _inputs(1, 300, 2, g, d, dtype)
  u.lower_for_cuda(lambda q, k, v: attention_block_max(
      q, k, v, block_size=bs, interpret=False), q, k, v)


def test_no_gradient_flows():
  q, k, v = _inputs(1, 20, 1, 2, 16, jnp.float32)
  grad = jax.grad(lambda q: jnp.sum(attention_block_max(
      q, k, v, block_size=16, interpret=True)[1]))(q)
  assert np.all(np.asarray(grad) == 0)
