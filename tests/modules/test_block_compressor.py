"""BlockCompressor and extract_blocks against plain Python loops."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import compression
from nsa_jax.modules import BlockCompressor

# One compilation per shape instead of one per eager op.
extract_blocks = jax.jit(compression.extract_blocks, static_argnums=(1, 2))
call = nnx.jit(lambda layer, x: layer(x))


def windows_loop(x, block_size, stride):
  """[B, Tc, l, H, D] by slicing window i = [i*d, i*d + l) one at a time."""
  x = np.asarray(x)
  b, seq_len, h, dim = x.shape
  out = []
  i = 0
  while i * stride + block_size <= seq_len:
    out.append(x[:, i * stride:i * stride + block_size])
    i += 1
  if not out:
    return np.zeros((b, 0, block_size, h, dim), x.dtype)
  return np.stack(out, axis=1)


def random_x(seq_len, heads=2, dim=4, seed=0):
  # numpy, not jax.random: one threefry compilation per shape is slow on CPU.
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((2, seq_len, heads, dim)),
                     jnp.float32)


# (T, l, d): T multiple of nothing, exactly l, one short of l, l = d.
BLOCK_CASES = [(37, 8, 4), (16, 8, 4), (7, 8, 4), (23, 8, 2), (10, 4, 4),
               (33, 12, 4)]


@pytest.mark.parametrize("seq_len,block_size,stride", BLOCK_CASES)
def test_extract_blocks_equals_loop(seq_len, block_size, stride):
  x = random_x(seq_len)
  got = extract_blocks(x, block_size, stride)
  want = windows_loop(x, block_size, stride)
  tc = max(0, (seq_len - block_size) // stride + 1)
  chex.assert_shape(got, (2, tc, block_size, 2, 4))
  np.testing.assert_array_equal(np.asarray(got), want)


def test_extract_blocks_rejects_stride_not_dividing_block():
  with pytest.raises(ValueError, match="multiple"):
    compression.extract_blocks(random_x(16), 6, 4)


@pytest.mark.parametrize("seq_len,block_size,stride", BLOCK_CASES)
def test_mean_is_mean_of_each_window(seq_len, block_size, stride):
  x = random_x(seq_len)
  layer = BlockCompressor(4, block_size=block_size, stride=stride,
                          kind="mean", rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(layer, nnx.Param))  # no parameters
  want = windows_loop(x, block_size, stride).mean(axis=2)
  chex.assert_trees_all_close(call(layer, x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seq_len", [37, 8, 5])
def test_mlp_shape_and_parameters(seq_len):
  layer = BlockCompressor(4, block_size=8, stride=4, kind="mlp", hidden=12,
                          rngs=nnx.Rngs(0))
  chex.assert_shape(layer.position[...], (8, 4))
  chex.assert_shape(layer.fc1.kernel[...], (8 * 4, 12))
  chex.assert_shape(layer.fc2.kernel[...], (12, 4))
  out = call(layer, random_x(seq_len, heads=3))
  tc = max(0, (seq_len - 8) // 4 + 1)
  chex.assert_shape(out, (2, tc, 3, 4))
  chex.assert_type(out, jnp.float32)


def test_mlp_is_shared_across_heads_and_sees_order():
  layer = BlockCompressor(4, block_size=8, stride=4, kind="mlp",
                          rngs=nnx.Rngs(0))
  one_head = random_x(20, heads=1)
  out = call(layer, jnp.concatenate([one_head, one_head], axis=2))
  chex.assert_trees_all_close(out[:, :, 0], out[:, :, 1])
  # The intra-block position embedding and the flattening make phi depend on
  # the order of tokens inside a block, unlike the mean.
  flipped = call(layer, one_head[:, ::-1])[:, ::-1]
  assert not np.allclose(np.asarray(flipped), np.asarray(call(layer, one_head)))


def test_mlp_block_sees_only_its_window():
  """Output token i changes only when x changes inside [i*d, i*d + l)."""
  layer = BlockCompressor(4, block_size=8, stride=4, kind="mlp",
                          rngs=nnx.Rngs(0))
  x = random_x(24)
  base = np.asarray(call(layer, x))
  changed = np.asarray(call(layer, x.at[:, 13].add(1.0)))
  moved = np.abs(changed - base).max(axis=(0, 2, 3)) > 0  # [Tc]
  want = [i * 4 <= 13 < i * 4 + 8 for i in range(base.shape[1])]
  np.testing.assert_array_equal(moved, want)


def test_rejects_unknown_kind():
  with pytest.raises(ValueError, match="kind"):
    BlockCompressor(4, block_size=8, stride=4, kind="max", rngs=nnx.Rngs(0))
