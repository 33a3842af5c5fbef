"""select_blocks and top_n_blocks: the selection rules of the spec."""

import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig
from nsa_jax import ops
from nsa_jax import reference
from nsa_jax.selection import compressed_to_selection_scores
from nsa_jax.selection import top_n_blocks

from nsa_cases import make_inputs
from nsa_cases import TINY


def _lse(x):
  return ops.compressed_attention(
      x["q"], x["k_cmp"], x["v_cmp"], block_size=TINY.cmp_block,
      stride=TINY.cmp_stride, impl="reference")[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_rule_by_rule_oracle(case, seed):
  x = make_inputs(case, seed=seed)
  lse = _lse(x)
  got = np.sort(np.asarray(ops.select_blocks(x["q"], x["k_cmp"], lse, TINY)),
                -1)
  want = np.sort(np.asarray(reference.select_blocks_reference(
      x["q"], x["k_cmp"], lse, TINY)), -1)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("config", [
    TINY,
    NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=5,
              num_initial=2, num_local=3, window=8),
    NSAConfig(cmp_block=4, cmp_stride=4, sel_block=16, num_selected=3,
              num_initial=0, num_local=1, window=8),
], ids=["tiny", "2init-3local", "l=d"])
def test_invariants(config):
  rng = np.random.default_rng(0)
  seq_len, ts = 70, config.num_selection_blocks(70)
  scores = jnp.asarray(rng.random((2, seq_len, 3, ts)), jnp.float32)
  table = np.asarray(top_n_blocks(scores, config))
  assert table.shape == (2, seq_len, 3, config.num_selected)
  assert table.dtype == np.int32
  for t in range(seq_len):
    own = t // config.sel_block
    forced = {j for j in range(config.num_initial) if j <= own}
    forced |= {j for j in range(own - config.num_local + 1, own + 1) if j >= 0}
    for row in table[:, t].reshape(-1, config.num_selected):
      chosen = [j for j in row if j >= 0]
      assert len(chosen) == len(set(chosen)), "repeated block"
      assert all(0 <= j <= own for j in chosen), "non-causal block"
      assert forced <= set(chosen), "forced block missing"
      assert len(chosen) == min(config.num_selected, own + 1), (
          "-1 padding while candidates remain")


def test_ties_go_to_lower_index():
  config = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4,
                     num_initial=1, num_local=1, window=8)
  # Query 63 owns block 7; blocks 1..6 tie, so 1 and 2 fill the two free slots.
  scores = jnp.zeros((1, 64, 1, 8)).at[:, :, :, 1:7].set(0.5)
  table = np.asarray(top_n_blocks(scores, config))
  assert set(table[0, 63, 0]) == {0, 7, 1, 2}
  # A higher score wins over a lower index.
  table = np.asarray(top_n_blocks(scores.at[:, :, :, 5].set(0.9), config))
  assert set(table[0, 63, 0]) == {0, 7, 5, 1}


def test_eq9_mapping_by_hand():
  # l=8, d=4, l'=16: a = 4 chunks per block, b = 2 blocks per chunk.
  config = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3,
                     window=4)
  p_cmp = jnp.arange(1.0, 7.0)  # Tc = 6, T = 28 -> Ts = 2
  got = np.asarray(compressed_to_selection_scores(p_cmp, config, 2))
  # Block 0: sum over m<4, n<2 of p[m - n] (valid) = p0 + (p1+p0) + (p2+p1)
  # + (p3+p2); block 1: p[4+m-n] = (p4+p3) + (p5+p4) + p5 + 0.
  p = np.arange(1.0, 7.0)
  want = [p[0] + p[1] + p[0] + p[2] + p[1] + p[3] + p[2],
          p[4] + p[3] + p[5] + p[4] + p[5]]
  np.testing.assert_allclose(got, want)


def test_short_sequence_selects_what_exists():
  x = make_inputs(type("C", (), dict(b=1, t=5, hq=2, hkv=1, dk=8, dv=8))())
  table = ops.select_blocks(x["q"], x["k_cmp"], _lse(x), TINY)
  np.testing.assert_array_equal(np.sort(np.asarray(table), -1)[..., :],
                                np.broadcast_to([-1, -1, -1, 0], (1, 5, 1, 4)))
