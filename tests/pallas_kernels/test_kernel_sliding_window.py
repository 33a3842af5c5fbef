"""Branch 3 (Pallas path through the selected kernel) vs the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import reference
from pallas_kernels import sliding_window_attention
from pallas_kernels.sliding_window import cudnn_supported
from pallas_kernels.sliding_window import window_block_table

import kernel_test_utils as u


def _inputs(seq_len, group, dk, dv, dtype):
  ks = jax.random.split(jax.random.key(0), 4)
  q = u.normal(ks[0], (1, seq_len, 2 * group, dk), dtype)
  k = u.normal(ks[1], (1, seq_len, 2, dk), dtype)
  v = u.normal(ks[2], (1, seq_len, 2, dv), dtype)
  d_out = u.normal(ks[3], (1, seq_len, 2 * group, dv), jnp.float32)
  return q, k, v, d_out


@pytest.mark.parametrize("window,group,dtype", [
    (1, 2, jnp.float32),  # only the query's own key
    (8, 1, jnp.float32),
    (20, 4, jnp.bfloat16),  # window wider than one key block
])
def test_forward_and_gradients(window, group, dtype):
  q, k, v, d_out = _inputs(37, group, 16, 24, dtype)
  def kernel(q, k, v):
    return sliding_window_attention(q, k, v, window=window, interpret=True)

  def ref(q, k, v):
    return reference.sliding_window_attention_reference(q, k, v,
                                                        window=window)
  u.assert_close(kernel(q, k, v), ref(q, k, v), dtype)
  loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * d_out)
  grads = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
  u.assert_finite(grads)
  u.assert_close(grads, jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v),
                 dtype, "grad")


@pytest.mark.parametrize("seq_len,window,block", [(37, 8, 16), (70, 20, 16),
                                                  (50, 64, 64)])
def test_block_table_covers_exactly_the_window(seq_len, window, block):
  table = np.asarray(window_block_table(seq_len, window, block))
  for t in range(seq_len):
    want = set(range(max(0, t - window + 1) // block, t // block + 1))
    got = set(table[t][table[t] >= 0].tolist())
    assert got == want, t


def test_cudnn_only_on_gpu():
  q, k, v, _ = _inputs(20, 1, 16, 16, jnp.bfloat16)
  assert cudnn_supported(q, k, v) == (jax.default_backend() == "gpu")
  with pytest.raises(ValueError, match="implementation"):
    sliding_window_attention(q, k, v, window=4, implementation="flash")
