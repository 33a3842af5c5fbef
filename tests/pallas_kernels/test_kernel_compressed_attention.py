"""Branch-1 kernel vs the dense reference: forward, gradients, lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import reference
from pallas_kernels import compressed_attention
from pallas_kernels import launch_config

import kernel_test_utils as u

L, D = 8, 4  # compressed block l and stride d


def _inputs(seq_len, num_kv_heads, group, dk, dv, dtype, seed=0):
  tc = max(0, (seq_len - L) // D + 1)
  rng = np.random.default_rng(seed)
  q = u.normal(rng, (2, seq_len, num_kv_heads * group, dk), dtype)
  k = u.normal(rng, (2, tc, num_kv_heads, dk), dtype)
  v = u.normal(rng, (2, tc, num_kv_heads, dv), dtype)
  d_out = u.normal(rng, (2, seq_len, num_kv_heads * group, dv), jnp.float32)
  return q, k, v, d_out


def _loss(fn, d_out):
  def loss(q, k, v):
    out, lse = fn(q, k, v)
    # lse enters the loss too (its cotangent feeds the kernel's delta term);
    # -inf rows are masked out of the sum.
    lse_term = jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0)
    return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(lse_term)
  # Jitted: called eagerly, the kernel's XLA glue runs op by op, each op
  # compiled alone (about 5x slower in interpret mode).
  return jax.jit(loss)


def _check_against_reference(kernel, q, k, v, d_out, dtype):
  """Forward, lse and gradients of ``kernel`` against the reference."""
  ref = functools.partial(reference.compressed_attention_reference,
                          block_size=L, stride=D)
  (out, lse), grads = u.output_and_grads(kernel, d_out)(q, k, v)
  (ref_out, ref_lse), ref_grads = u.output_and_grads(ref, d_out)(q, k, v)
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  u.assert_close(out, ref_out, dtype)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
  # Queries t < l - 1 see nothing: exactly 0 and -inf.
  assert np.all(np.asarray(out[:, :L - 1]) == 0)
  assert np.all(np.isneginf(np.asarray(lse[:, :L - 1])))
  finite = np.isfinite(np.asarray(ref_lse))
  u.assert_close(np.where(finite, lse, 0), np.where(finite, ref_lse, 0),
                 dtype)
  u.assert_finite(grads)
  u.assert_close(grads, ref_grads, dtype, "grad")
  # Rows that see nothing get no gradient.
  assert np.all(np.asarray(grads[0][:, :L - 1]) == 0)


class CompressedAttentionCases:
  """The kernel's tests; subclasses say whether it runs interpreted."""

  INTERPRET = True

  @pytest.mark.parametrize(
      "seq_len,num_kv_heads,group,dk,dv,dtype,block_k,segment",
      [
          (37, 2, 1, 16, 16, jnp.float32, None, None),  # G=1, T off a tile
          (50, 1, 2, 24, 16, jnp.float32, None, None),  # Dk != Dv, padded
          (37, 2, 4, 16, 32, jnp.bfloat16, None, None),
          (33, 1, 16, 16, 16, jnp.float32, None, None),  # G=16: block_q = 1
          (100, 1, 3, 16, 24, jnp.float32, 16, None),  # G=3 padded, 2 chunks
          (8, 1, 2, 16, 16, jnp.float32, None, None),  # T = l: Tc = 1
          (30, 1, 2, 16, 24, jnp.float16, None, None),
          (45, 1, 2, 48, 32, jnp.float32, None, None),  # forward q.k: 32 + 16
          # dK/dV over 2 query segments of 64 positions, 2 chunks; the
          # segment before chunk 1's first query (t = 71) writes zeros.
          (100, 1, 2, 16, 16, jnp.float32, 16, 64),
      ])
  def test_forward_and_gradients(self, seq_len, num_kv_heads, group, dk, dv,
                                 dtype, block_k, segment):
    q, k, v, d_out = _inputs(seq_len, num_kv_heads, group, dk, dv, dtype)
    kernel = functools.partial(
        compressed_attention, block_size=L, stride=D,
        interpret=self.INTERPRET, block_k=block_k, segment=segment)
    _check_against_reference(kernel, q, k, v, d_out, dtype)

  @pytest.mark.parametrize("block_q,fwd_block_q,dtype", [
      (8, 32, jnp.bfloat16),  # residuals cut from 128 padded rows to 104
      (32, 8, jnp.float32),  # residuals padded from 104 rows to 128
  ])
  def test_forward_tiles_differ_from_backward(self, block_q, fwd_block_q,
                                              dtype):
    q, k, v, d_out = _inputs(100, 1, 2, 16, 16, dtype)
    kernel = functools.partial(
        compressed_attention, block_size=L, stride=D,
        interpret=self.INTERPRET, block_q=block_q, fwd_block_q=fwd_block_q)
    _check_against_reference(kernel, q, k, v, d_out, dtype)

  def test_no_compressed_tokens(self):
    q, k, v, d_out = _inputs(5, 1, 2, 16, 24, jnp.float32)  # T < l: Tc = 0
    assert k.shape[1] == 0
    kernel = functools.partial(compressed_attention, block_size=L, stride=D,
                               interpret=self.INTERPRET)
    (out, lse), grads = u.output_and_grads(kernel, d_out)(q, k, v)
    assert out.shape == (2, 5, 2, 24)
    assert np.all(np.asarray(out) == 0)
    assert np.all(np.isneginf(np.asarray(lse)))
    u.assert_finite(grads)
    assert np.all(np.asarray(grads[0]) == 0)

  def test_deterministic(self):
    q, k, v, d_out = _inputs(50, 1, 4, 16, 16, jnp.bfloat16)
    kernel = functools.partial(compressed_attention, block_size=L, stride=D,
                               interpret=self.INTERPRET)
    run = u.output_and_grads(kernel, d_out)
    u.assert_bitwise_equal(run(q, k, v), run(q, k, v))


class TestCompressedAttentionInterpret(CompressedAttentionCases):
  INTERPRET = True


@pytest.mark.gpu
class TestCompressedAttentionGpu(CompressedAttentionCases):
  INTERPRET = False


def test_rejects_bad_shapes():
  q, k, v, _ = _inputs(37, 2, 2, 16, 16, jnp.float32)
  with pytest.raises(ValueError, match="Dk"):
    compressed_attention(q, k[..., :8], v, block_size=L, stride=D)
  with pytest.raises(ValueError, match="compressed tokens"):
    compressed_attention(q[:, :20], k, v, block_size=L, stride=D)
  with pytest.raises(ValueError, match="block_q"):
    compressed_attention(q, k, v, block_size=L, stride=D, block_q=2)


@pytest.mark.lowering
@pytest.mark.parametrize("entry", launch_config.table_entries("compressed"))
@pytest.mark.parametrize("group,dk,dv", [(1, 24, 16), (16, 192, 128)])
def test_lowers_to_triton(entry, group, dk, dv):
  q, k, v, d_out = _inputs(70, 1, group, dk, dv, jnp.bfloat16)
  launch = launch_config.make_config(entry, group=group, seq_len=70,
                                     num_keys=k.shape[1])
  kernel = functools.partial(
      compressed_attention, block_size=L, stride=D, interpret=False,
      block_q=launch.block_q, block_k=launch.block_k,
      num_warps=launch.num_warps, num_stages=launch.num_stages)
  u.lower_for_cuda(kernel, q, k, v)
  u.lower_for_cuda(jax.grad(_loss(kernel, d_out), argnums=(0, 1, 2)), q, k, v)
