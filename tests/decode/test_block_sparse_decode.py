"""block_sparse_decode (any block table) against the dense masked reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.decode import block_sparse_decode
from nsa_jax.decode import query_positions
from nsa_jax.reference import masked_attention
from nsa_jax.reference import selected_block_mask

from nsa_cases import normal

BLOCK = 16
# Jitted: one program per shape, where eager calls run op by op.
_decode = jax.jit(block_sparse_decode, static_argnames="block_size")


@functools.partial(jax.jit, static_argnums=(5,))
def _row_reference(q, k, v, table, positions, scale):
  """Dense masked attention of one row's queries [Nq, Hq, Dk] at their
  ``positions`` [Nq] over the row's whole cache k, v [S, Hkv, D]; ``table``
  [Nq, Hkv, n]. Jitted: one program for every row of a shape."""
  size, hkv = k.shape[0], k.shape[1]
  q_full = jnp.zeros((1, size) + q.shape[1:], q.dtype).at[0, positions].set(q)
  t_full = jnp.full((1, size, hkv, table.shape[-1]), -1, jnp.int32)
  t_full = t_full.at[0, positions].set(table)
  mask = jnp.repeat(selected_block_mask(t_full, size, BLOCK),
                    q.shape[1] // hkv, axis=2)
  out, lse = masked_attention(q_full, k[None], v[None], mask, scale)
  return out[0, positions], lse[0, positions]


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
  q = normal(rng, (b, nq, hq, dk))
  k = normal(rng, (b, size, hkv, dk))
  v = normal(rng, (b, size, hkv, dv))
  lengths = jnp.array([nq + 2, 37, 64], jnp.int32)
  table = _random_table(rng, b, nq, hkv, n, size // BLOCK)
  # Garbage past each row's length must contribute nothing, even NaN.
  pos = jnp.arange(size)[None, :, None, None]
  valid = pos < lengths[:, None, None, None]
  out, lse = _decode(
      q, jnp.where(valid, k, jnp.nan), jnp.where(valid, v, jnp.inf),
      jnp.asarray(table), lengths, block_size=BLOCK)
  positions = query_positions(lengths, nq)
  for row in range(b):
    want, want_lse = _row_reference(q[row], k[row], v[row],
                                    jnp.asarray(table[row]), positions[row],
                                    dk ** -0.5)
    np.testing.assert_allclose(out[row], want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse[row], want_lse, atol=2e-5, rtol=2e-5)
  assert np.isfinite(np.asarray(out)).all()


def test_one_query_form_equals_the_multi_query_form():
  rng = np.random.default_rng(0)
  q = normal(rng, (2, 4, 8))
  k = normal(rng, (2, 32, 2, 8))
  v = normal(rng, (2, 32, 2, 8))
  table = jnp.array([[[0, 1], [1, -1]], [[-1, -1], [0, -1]]], jnp.int32)
  lengths = jnp.array([20, 7], jnp.int32)
  one, one_lse = _decode(q, k, v, table, lengths, block_size=16)
  many, many_lse = _decode(q[:, None], k, v, table[:, None], lengths,
                           block_size=16)
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
