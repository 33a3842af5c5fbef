"""Fused block scores and GPU top-n selection vs the references; lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from selection_checks import assert_same_sets_up_to_ties

from nsa_jax import reference
from nsa_jax import selection
from nsa_jax.config import NSAConfig
from pallas_kernels import block_scores
from pallas_kernels import select_blocks
from pallas_kernels import triton_compat as tc
from pallas_kernels.block_scores import ScoreLaunch

import kernel_test_utils as u

# a = l'/d = 2, b = l/d = 2: a block covered by tokens of two steps.
_SMALL = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, num_selected=4,
                   window=8)
# a = 4, b = 2 (the paper's ratios) with n = 5.
_PAPER = NSAConfig(num_selected=5)


def _inputs(config, seq_len, num_kv_heads, group, dk, dtype, seed=0):
  tc = config.num_compressed(seq_len)
  rng = np.random.default_rng(seed)
  q = u.normal(rng, (2, seq_len, num_kv_heads * group, dk), dtype)
  k = u.normal(rng, (2, tc, num_kv_heads, dk), dtype)
  v = u.normal(rng, (2, tc, num_kv_heads, dk), dtype)
  _, lse = _compressed_reference(q, k, v, block_size=config.cmp_block,
                                 stride=config.cmp_stride)
  return q, k, lse


_compressed_reference = jax.jit(reference.compressed_attention_reference,
                                static_argnames=("block_size", "stride"))
_scores_reference = jax.jit(reference.block_scores_reference,
                            static_argnums=(3,))


# Jitted: called eagerly, the kernels' XLA glue runs op by op, each op
# compiled alone.
@functools.partial(jax.jit, static_argnums=(3, 4), static_argnames=(
    "score_bytes", "launch"))
def _scores(q, k, lse, config, interpret, **kwargs):
  return block_scores(q, k, lse, cmp_block=config.cmp_block,
                      cmp_stride=config.cmp_stride,
                      sel_block=config.sel_block, interpret=interpret,
                      **kwargs)


@functools.partial(jax.jit, static_argnums=(3, 4), static_argnames=(
    "score_bytes", "launch"))
def _select(q, k, lse, config, interpret, **kwargs):
  return select_blocks(
      q, k, lse, cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
      sel_block=config.sel_block, num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local,
      interpret=interpret, **kwargs)


CASES = [
    (NSAConfig.tiny(), 50, 2, 1, 16, jnp.float32),
    (NSAConfig.tiny(), 37, 2, 3, 16, jnp.float32),  # G padded to 4
    (NSAConfig.tiny(), 133, 1, 16, 32, jnp.bfloat16),
    (NSAConfig.tiny(), 5, 1, 2, 16, jnp.float32),  # T < l: nothing visible
    (NSAConfig.tiny(), 16, 1, 4, 16, jnp.float16),  # T = l'
    (_SMALL, 70, 2, 2, 16, jnp.float32),
    (_PAPER, 300, 1, 4, 24, jnp.float32),  # Dk padded to 32
    (_PAPER, 200, 1, 2, 48, jnp.float32),  # Dk 48: dots of 32 + 16 columns
]


class BlockSelectCases:
  """The kernels' tests; subclasses say whether they run interpreted."""

  INTERPRET = True

  @pytest.mark.parametrize("config,seq_len,hkv,group,dk,dtype", CASES)
  def test_scores_match_reference(self, config, seq_len, hkv, group, dk,
                                  dtype):
    q, k, lse = _inputs(config, seq_len, hkv, group, dk, dtype)
    got = _scores(q, k, lse, config, self.INTERPRET)
    want = _scores_reference(q, k, lse, config)
    assert got.shape == want.shape and got.dtype == jnp.float32
    # Scores are sums of probabilities (<= b * G per block): float32
    # tolerance whatever the input dtype, since both sides upcast the same
    # products.
    u.assert_close(got, want, jnp.float32)

  @pytest.mark.parametrize("config,seq_len,hkv,group,dk,dtype", CASES)
  def test_selection_matches_reference(self, config, seq_len, hkv, group,
                                       dk, dtype):
    q, k, lse = _inputs(config, seq_len, hkv, group, dk, dtype, seed=1)
    got = _select(q, k, lse, config, self.INTERPRET)
    scores = _scores_reference(q, k, lse, config)
    want = selection.top_n_blocks(scores, config)
    assert got.dtype == jnp.int32
    assert_same_sets_up_to_ties(got, want, scores)

  def test_slices_and_small_tiles_give_the_same_table(self):
    """Query slices (bounded score memory) and other tiles change nothing."""
    config = _SMALL
    q, k, lse = _inputs(config, 70, 2, 2, 16, jnp.float32, seed=2)
    whole = _select(q, k, lse, config, self.INTERPRET)
    # One score tile per slice.
    sliced = _select(q, k, lse, config, self.INTERPRET, score_bytes=1)
    other = _select(q, k, lse, config, self.INTERPRET,
                    launch=ScoreLaunch(block_q=32, block_sel=32))
    np.testing.assert_array_equal(whole, sliced)
    np.testing.assert_array_equal(whole, other)

  def test_forced_blocks_ties_and_empty_slots(self):
    """Equal logits: forced blocks, then the lowest indices, then -1.

    With every logit 0, every fully visible block scores the same, so after
    the forced blocks (0 and the query's own) the free slots go to blocks 1
    and 2; a query with fewer than n causal blocks takes them all and pads -1.
    """
    config = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, num_selected=4,
                       num_initial=1, num_local=1, window=8)
    seq_len = 40
    q = jnp.zeros((1, seq_len, 2, 16), jnp.float32)
    k = jnp.zeros((1, config.num_compressed(seq_len), 1, 16), jnp.float32)
    _, lse = reference.compressed_attention_reference(
        q, k, k, block_size=4, stride=2)
    table = _select(q, k, lse, config, self.INTERPRET)
    got = np.sort(np.asarray(table)[0, :, 0], -1)
    for t in range(seq_len):
      own = t // 4
      if own < 4:
        want = [-1] * (3 - own) + list(range(own + 1))
      else:
        want = [0, 1, 2, own]
      np.testing.assert_array_equal(got[t], want, err_msg=f"t={t}")

  def test_no_gradient_flows(self):
    config = NSAConfig.tiny()
    q, k, lse = _inputs(config, 20, 1, 2, 16, jnp.float32)
    grad = jax.grad(lambda q: jnp.sum(
        _scores(q, k, lse, config, self.INTERPRET)))(q)
    assert np.all(np.asarray(grad) == 0)

  def test_deterministic(self):
    q, k, lse = _inputs(NSAConfig.tiny(), 50, 1, 4, 16, jnp.bfloat16)
    run = lambda: (_scores(q, k, lse, NSAConfig.tiny(), self.INTERPRET),
                   _select(q, k, lse, NSAConfig.tiny(), self.INTERPRET))
    u.assert_bitwise_equal(run(), run())


class TestBlockSelectInterpret(BlockSelectCases):
  INTERPRET = True


@pytest.mark.gpu
class TestBlockSelectGpu(BlockSelectCases):
  INTERPRET = False


@pytest.mark.lowering
@pytest.mark.parametrize("group,dk,dtype", [
    (1, 24, jnp.bfloat16), (16, 128, jnp.bfloat16), (16, 192, jnp.float32),
    (4, 64, jnp.float16)])
def test_lowers_to_triton(group, dk, dtype):
  config = NSAConfig.paper()
  q, k, lse = _inputs(config, 4133, 1, group, dk, dtype)
  u.lower_for_cuda(
      lambda q, k, lse: select_blocks(  # pylint: disable=g-long-lambda
          q, k, lse, cmp_block=32, cmp_stride=16, sel_block=64,
          num_selected=16, num_initial=1, num_local=2, interpret=False),
      q, k, lse)


@pytest.mark.parametrize("dim,parts", [
    (16, ((0, 16),)), (24, ((0, 32),)), (48, ((0, 32), (32, 16))),
    (64, ((0, 64),)), (96, ((0, 64), (64, 32))), (128, ((0, 128),)),
    (192, ((0, 128), (128, 64))), (8, ((0, 16),)), (12, ((0, 16),))])
def test_dot_parts_skip_the_padding_of_three_quarter_dims(dim, parts):
  """Dims of 3/4 of their padded width contract in a half and a quarter
  (both powers of two, >= the smallest dot); others in one padded part."""
  assert tc.dot_parts(dim) == parts
