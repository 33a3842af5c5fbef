"""block_sparse_decode (any block table) against the dense masked reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.decode import block_sparse_decode
from nsa_jax.decode import query_positions
from nsa_jax.reference import masked_attention
from nsa_jax.reference import selected_block_mask

BLOCK = 16


def _random_table(rng, b, nq, hkv, n, num_blocks):
  """Distinct blocks anywhere in the cache (causal or not), some -1 slots."""
  table = np.full((b, nq, hkv, n), -1, np.int32)
  for index in np.ndindex(b, nq, hkv):
    count = rng.integers(0, n + 1)
    table[index][:count] = rng.choice(num_blocks, count, replace=False)
    rng.shuffle(table[index])
  return table


@pytest.mark.parametrize("nq", [1, 3])
@pytest.mark.parametrize("hq,hkv,dk,dv", [(4, 2, 16, 8), (8, 1, 8, 12),
                                          (2, 2, 8, 8)])
def test_equals_the_reference_at_the_query_positions(nq, hq, hkv, dk, dv):
  b, size, n = 3, 64, 3
  rng = np.random.default_rng(nq * 100 + hq)
  keys = jax.random.split(jax.random.key(hq + dv), 3)
  q = jax.random.normal(keys[0], (b, nq, hq, dk))
  k = jax.random.normal(keys[1], (b, size, hkv, dk))
  v = jax.random.normal(keys[2], (b, size, hkv, dv))
  lengths = jnp.array([nq + 2, 37, 64], jnp.int32)
  table = _random_table(rng, b, nq, hkv, n, size // BLOCK)
  # Garbage past each row's length must contribute nothing, even NaN.
  pos = jnp.arange(size)[None, :, None, None]
  valid = pos < lengths[:, None, None, None]
  out, lse = block_sparse_decode(
      q, jnp.where(valid, k, jnp.nan), jnp.where(valid, v, jnp.inf),
      jnp.asarray(table), lengths, block_size=BLOCK)
  positions = np.asarray(query_positions(lengths, nq))
  for row in range(b):
    # The reference over the whole cache, queries at their positions.
    q_full = jnp.zeros((1, size, hq, dk)).at[0, positions[row]].set(q[row])
    t_full = np.full((1, size, hkv, n), -1, np.int32)
    t_full[0, positions[row]] = table[row]
    mask = jnp.repeat(selected_block_mask(jnp.asarray(t_full), size, BLOCK),
                      hq // hkv, axis=2)
    want, want_lse = masked_attention(q_full, k[row:row + 1], v[row:row + 1],
                                      mask, dk ** -0.5)
    np.testing.assert_allclose(out[row], want[0, positions[row]],
                               atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse[row], want_lse[0, positions[row]],
                               atol=2e-5, rtol=2e-5)
  assert np.isfinite(np.asarray(out)).all()


def test_one_query_form_equals_the_multi_query_form():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 4, 8))
  k = jax.random.normal(keys[1], (2, 32, 2, 8))
  v = jax.random.normal(keys[2], (2, 32, 2, 8))
  table = jnp.array([[[0, 1], [1, -1]], [[-1, -1], [0, -1]]], jnp.int32)
  lengths = jnp.array([20, 7], jnp.int32)
  one, one_lse = block_sparse_decode(q, k, v, table, lengths, block_size=16)
  many, many_lse = block_sparse_decode(q[:, None], k, v, table[:, None],
                                       lengths, block_size=16)
  np.testing.assert_array_equal(one, many[:, 0])
  np.testing.assert_array_equal(one_lse, many_lse[:, 0])
  # Row 1, kv head 0 has no block: zero output, lse -inf.
  np.testing.assert_array_equal(one[1, :2], 0.0)
  assert np.isneginf(np.asarray(one_lse[1, :2])).all()


def test_bad_shapes_are_clear_errors():
  q = jnp.zeros((2, 4, 8))
  k = v = jnp.zeros((2, 40, 2, 8))
  lengths = jnp.array([3, 4], jnp.int32)
  with pytest.raises(ValueError, match="multiple of block_size=16"):
    block_sparse_decode(q, k, v, jnp.zeros((2, 2, 1), jnp.int32), lengths,
                        block_size=16)
  k = v = jnp.zeros((2, 32, 2, 8))
  with pytest.raises(ValueError, match="block_table.shape"):
    block_sparse_decode(q, k, v, jnp.zeros((2, 3, 1), jnp.int32), lengths,
                        block_size=16)
  with pytest.raises(ValueError, match="lengths.shape"):
    block_sparse_decode(q, k, v, jnp.zeros((2, 2, 1), jnp.int32),
                        lengths[:1], block_size=16)
