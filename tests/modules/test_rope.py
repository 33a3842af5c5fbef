"""apply_rope: an isometry whose dot products depend only on m - n."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.modules import rope

# One compilation per shape instead of one per eager op.
apply_rope = jax.jit(rope.apply_rope, static_argnums=2)


def random_x(shape, seed=0, dtype=jnp.float32):
  # numpy, not jax.random: one threefry compilation per shape is slow on CPU.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("dim", [2, 16])
def test_preserves_norms(dim):
  x = random_x((2, 37, 3, dim))
  y = apply_rope(x, jnp.arange(37) * 7 + 3)
  chex.assert_shape(y, x.shape)
  chex.assert_trees_all_close(jnp.linalg.norm(y, axis=-1),
                              jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_position_zero_is_identity_and_others_rotate():
  x = random_x((1, 4, 2, 8))
  y = apply_rope(x, jnp.zeros(4, jnp.int32))
  chex.assert_trees_all_close(y, x, rtol=1e-6, atol=1e-6)
  assert not np.allclose(apply_rope(x, jnp.arange(1, 5)), x)


@pytest.mark.parametrize("base", [10000.0, 100.0])
def test_dot_product_depends_only_on_offset(base):
  dim = 16
  q = random_x((dim,), seed=1)
  k = random_x((dim,), seed=2)

  def dot(m, n):
    qm = apply_rope(q[None, None, None], jnp.array([m]), base)
    kn = apply_rope(k[None, None, None], jnp.array([n]), base)
    return float(jnp.vdot(qm, kn))

  for m, n in [(5, 2), (9, 9), (3, 11), (40, 0)]:
    for shift in (1, 17, 100):
      np.testing.assert_allclose(dot(m + shift, n + shift), dot(m, n),
                                 rtol=1e-4, atol=1e-4)
  # ... and does depend on the offset.
  assert abs(dot(5, 2) - dot(5, 4)) > 1e-3


def test_batched_positions_match_shared_positions():
  x = random_x((2, 6, 2, 8))
  positions = jnp.arange(6) + 10
  shared = apply_rope(x, positions)
  batched = apply_rope(x, jnp.stack([positions, positions]))
  chex.assert_trees_all_close(batched, shared)
  # Per-row positions: row 1 shifted by 3 equals rope of row 1 at pos + 3.
  per_row = apply_rope(x, jnp.stack([positions, positions + 3]))
  chex.assert_trees_all_close(per_row[1], apply_rope(x, positions + 3)[1])
  chex.assert_trees_all_close(per_row[0], shared[0])


def test_keeps_dtype_and_rejects_odd_dim():
  x = random_x((1, 4, 1, 8), dtype=jnp.bfloat16)
  chex.assert_type(apply_rope(x, jnp.arange(4)), jnp.bfloat16)
  with pytest.raises(ValueError, match="even"):
    rope.apply_rope(random_x((1, 4, 1, 7)), jnp.arange(4))


def _rope_numpy(x, positions, base=10000.0):
  """float64 RoPE, rotate-half convention, written out in numpy."""
  half = x.shape[-1] // 2
  freq = base ** (-np.arange(half) / half)
  angle = np.asarray(positions, np.float64)[:, None, None] * freq  # [T,1,D/2]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def test_matches_numpy_in_float32():
  x = np.random.default_rng(3).standard_normal((2, 9, 2, 8))
  positions = np.arange(9) * 5
  got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions))
  np.testing.assert_allclose(np.asarray(got), _rope_numpy(x, positions),
                             rtol=1e-4, atol=1e-5)


def test_keeps_float64_precision():
  x = np.random.default_rng(3).standard_normal((2, 9, 2, 8))
  positions = np.arange(9) * 5
  with jax.enable_x64(True):
    got = rope.apply_rope(jnp.asarray(x, jnp.float64), jnp.asarray(positions))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), _rope_numpy(x, positions),
                               rtol=1e-12, atol=1e-12)
