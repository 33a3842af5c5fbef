"""Fused block scores vs the literal Eq. 9 reference, and lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import reference
from nsa_jax.config import NSAConfig
from pallas_kernels import block_scores
from pallas_kernels import launch_config
import kernel_test_utils as u


def _inputs(config, seq_len, num_kv_heads, group, dk, dtype, seed=0):
  tc = config.num_compressed(seq_len)
  ks = jax.random.split(jax.random.key(seed), 3)
  q = u.normal(ks[0], (2, seq_len, num_kv_heads * group, dk), dtype)
  k = u.normal(ks[1], (2, tc, num_kv_heads, dk), dtype)
  v = u.normal(ks[2], (2, tc, num_kv_heads, dk), dtype)
  _, lse = reference.compressed_attention_reference(
      q, k, v, block_size=config.cmp_block, stride=config.cmp_stride)
  return q, k, lse


def _scores(q, k, lse, config, interpret=True, **kwargs):
  return block_scores(q, k, lse, cmp_block=config.cmp_block,
                      cmp_stride=config.cmp_stride,
                      sel_block=config.sel_block, interpret=interpret,
                      **kwargs)


class BlockScoresCases:
  """The kernel's tests; subclasses say whether it runs interpreted."""

  INTERPRET = True

  @pytest.mark.parametrize(
      "config,seq_len,group,dtype,kwargs",
      [
          (NSAConfig.tiny(), 50, 1, jnp.float32, {}),
          (NSAConfig.tiny(), 37, 3, jnp.float32, {}),  # G padded to 4
          (NSAConfig.tiny(), 33, 16, jnp.bfloat16, {}),
          (NSAConfig.tiny(), 29, 2, jnp.float16, {}),
          # a = 2, b = 2, Ts = 18: two tiles of 16 selection blocks, 3 key
          # chunks.
          (NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, num_selected=4,
                     window=8), 70, 2, jnp.float32,
           {"block_sel": 16, "block_k": 16}),
      ])
  def test_matches_reference(self, config, seq_len, group, dtype, kwargs):
    q, k, lse = _inputs(config, seq_len, 2, group, 16, dtype)
    got = _scores(q, k, lse, config, self.INTERPRET, **kwargs)
    want = reference.block_scores_reference(q, k, lse, config)
    assert got.shape == want.shape and got.dtype == jnp.float32
    # Scores are probabilities (<= b * G per block): float32 tolerance, also
    # for 16-bit inputs since both sides upcast the same values.
    u.assert_close(got, want, jnp.float32 if dtype == jnp.float32 else dtype)

  def test_no_compressed_tokens_and_no_gradient(self):
    config = NSAConfig.tiny()
    q, k, lse = _inputs(config, 6, 1, 2, 16, jnp.float32)
    scores = _scores(q, k, lse, config, self.INTERPRET)
    assert scores.shape == (2, 6, 1, 1) and np.all(np.asarray(scores) == 0)
    q, k, lse = _inputs(config, 20, 1, 2, 16, jnp.float32)
    grad = jax.grad(lambda q: jnp.sum(_scores(q, k, lse, config,
                                              self.INTERPRET)))(q)
    assert np.all(np.asarray(grad) == 0)

  def test_deterministic(self):
    config = NSAConfig.tiny()
    q, k, lse = _inputs(config, 50, 1, 4, 16, jnp.bfloat16)
    run = lambda: _scores(q, k, lse, config, self.INTERPRET)
    u.assert_bitwise_equal(run(), run())


class TestBlockScoresInterpret(BlockScoresCases):
  INTERPRET = True


@pytest.mark.gpu
class TestBlockScoresGpu(BlockScoresCases):
  INTERPRET = False


@pytest.mark.lowering
@pytest.mark.parametrize("entry", launch_config.table_entries("block_scores"))
@pytest.mark.parametrize("group,dk", [(1, 24), (16, 192)])
def test_lowers_to_triton(entry, group, dk):
  config = NSAConfig.tiny()
  q, k, lse = _inputs(config, 70, 1, group, dk, jnp.bfloat16)
  launch = launch_config.make_config(entry, group=group, seq_len=70,
                                     num_keys=k.shape[1])
  u.lower_for_cuda(
      lambda q, k, lse: block_scores(  # pylint: disable=g-long-lambda
          q, k, lse, cmp_block=8, cmp_stride=4, sel_block=16,
          interpret=False, block_q=launch.block_q, block_k=launch.block_k,
          num_warps=launch.num_warps, num_stages=launch.num_stages),
      q, k, lse)
