"""AttnGate: shapes, [max, min, mean] pooling, causal masking, RoPE, errors."""

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest
from seer_testing import random_module

from nsa_jax.modules import LMConfig
from nsa_jax.seer.config import SeerConfig
from nsa_jax.seer.config import Selection
from nsa_jax.seer.gate import AttnGate
from nsa_jax.seer.gate import pool_blocks
from nsa_jax.seer.gate import SeerGates

# Jitted: eager calls compile every primitive on its own, far slower here.
_call = nnx.jit(lambda gate, q, k: gate(q, k))
_keys = nnx.jit(lambda gate, k, start: gate.keys(k, start))
_queries = nnx.jit(lambda gate, q, positions: gate.queries(q, positions))


# A gate of one shape for the tests that need no other.
GATE = random_module(lambda: AttnGate(
    4, 2, 8, SeerConfig(block_size=4, gate_dim=6), rngs=nnx.Rngs(0)))


def _qk(b, t, hq, hkv, d, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, t, hq, d)), jnp.float32),
          jnp.asarray(rng.normal(size=(b, t, hkv, d)), jnp.float32))


@pytest.mark.parametrize("merge,hq,hkv,norm", [
    ("linear", 4, 1, True), ("mean", 4, 2, False)])  # G 4 and 2
def test_shapes_and_causal_distribution(merge, hq, hkv, norm):
  config = SeerConfig(block_size=4, gate_dim=6, query_merge=merge,
                      qk_norm=norm)
  make = lambda: AttnGate(hq, hkv, 8, config, rngs=nnx.Rngs(0))
  shapes = nnx.eval_shape(make)  # the initialisers' shapes, nothing drawn
  g = hq // hkv
  want = (hkv, g, 8, 6) if merge == "linear" else (hkv, 8, 6)
  assert shapes.q_weight.value.shape == want
  assert shapes.k_weight.value.shape == (hkv, 24, 6)
  assert (shapes.q_norm is not None) == norm
  gate = random_module(make)
  q, k = _qk(2, 19, hq, hkv, 8)  # T off a block edge: 4 complete blocks
  log_probs = _call(gate, q, k)
  assert log_probs.shape == (2, 19, hkv, 4) and log_probs.dtype == jnp.float32
  t = np.arange(19)[:, None]
  visible = np.arange(4)[None, :] < t // 4  # [T, N]: blocks before t's own
  lp = np.asarray(log_probs).transpose(0, 2, 1, 3)  # [B, Hkv, T, N]
  assert np.isneginf(lp[:, :, ~visible]).all()
  assert np.isfinite(lp[:, :, visible]).all()
  sums = np.exp(lp).sum(-1)  # [B, Hkv, T]
  np.testing.assert_allclose(sums[..., 4:], 1.0, rtol=1e-5)
  assert (sums[..., :4] == 0).all()  # t < b: no block before its own


def test_a_query_reads_only_blocks_before_its_own():
  gate = GATE
  q, k = _qk(2, 19, 4, 2, 8)
  t = 9  # own block 2: blocks 0 and 1 are scored
  q2 = q.at[:, t + 1:].set(7.0)
  k2 = k.at[:, 8:].set(-3.0)  # its own block and later
  base = np.asarray(_call(gate, q, k)[:, t])
  np.testing.assert_array_equal(base, np.asarray(_call(gate, q2, k2)[:, t]))
  assert not np.allclose(_call(gate, q, k.at[:, 4].set(5.0))[:, t], base)


def test_pooling_is_max_min_mean_of_complete_blocks():
  k = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 3, 5)),
                  jnp.float32)
  pooled = np.asarray(pool_blocks(k, 4))
  blocks = np.asarray(k)[:, :8].reshape(2, 2, 4, 3, 5)
  want = np.concatenate([blocks.max(2), blocks.min(2), blocks.mean(2)], -1)
  np.testing.assert_allclose(pooled, want, rtol=1e-6)


def test_block_keys_are_rotated_at_the_block_start():
  """The keys of blocks 2.. of a sequence equal those of its suffix from
  position 2b given that start; queries likewise by their positions."""
  gate = GATE
  q, k = _qk(2, 16, 4, 2, 8)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                 atol=1e-6)
  whole = _keys(gate, k, 0)
  close(_keys(gate, k[:, 8:], 8), whole[:, 2:])
  per_row = _keys(gate, k[:, 8:], jnp.array([8, 0]))
  close(per_row[0], whole[0, 2:])
  close(per_row[1], _keys(gate, k[:, 8:], 0)[1])
  close(_queries(gate, q[:, 8:], jnp.arange(8, 16)),
        _queries(gate, q, jnp.arange(16))[:, 8:])


def test_bad_settings_raise_clear_errors():
  with pytest.raises(ValueError, match="gate_dim"):
    SeerConfig(gate_dim=7)
  with pytest.raises(ValueError, match="query_merge"):
    SeerConfig(query_merge="sum")
  with pytest.raises(ValueError, match="block_size"):
    SeerConfig(block_size=0)
  with pytest.raises(ValueError, match="exactly one"):
    Selection(budget=128, threshold=0.1)
  with pytest.raises(ValueError, match="exactly one"):
    Selection()
  with pytest.raises(ValueError, match="threshold"):
    Selection(threshold=1.5)
  with pytest.raises(ValueError, match="at least 2"):
    Selection(budget=100).num_slots(64, 10)
  with pytest.raises(ValueError, match="multiple of"):
    AttnGate(3, 2, 8, SeerConfig(), rngs=nnx.Rngs(0))
  gate = GATE
  with pytest.raises(ValueError, match="heads"):
    gate.queries(jnp.zeros((1, 8, 2, 8)), jnp.arange(8))
  with pytest.raises(ValueError, match="one sequence"):
    gate(jnp.zeros((1, 8, 4, 8)), jnp.zeros((1, 7, 2, 8)))
  with pytest.raises(ValueError, match="full-attention"):
    SeerGates(LMConfig(attention="nsa"), SeerConfig(), rngs=nnx.Rngs(0))
