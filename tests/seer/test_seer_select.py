"""Block tables from gate probabilities: budget, threshold, forced blocks."""

import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.seer.config import Selection
from nsa_jax.seer.select import select_blocks

# One query at t = 45 (own block 5 of 8-key blocks), blocks 0 .. 4 scored.
PROBS = jnp.array([[[[0.05, 0.4, 0.1, 0.3, 0.15]]]])  # [B, Q, Hkv, N]
POS = jnp.array([[45]])


def _chosen(selection, num_blocks=8):
  table = np.asarray(select_blocks(PROBS, POS, selection, 8, num_blocks))
  return table[0, 0, 0]


def test_budget_reads_block_zero_the_own_block_then_the_top_scores():
  assert _chosen(Selection(budget=32)).tolist() == [0, 5, 1, 3]
  assert _chosen(Selection(budget=16)).tolist() == [0, 5]


def test_budget_over_the_causal_blocks_reads_them_all():
  got = _chosen(Selection(budget=1000))  # 8 slots: all 6 causal blocks
  assert sorted(got[got >= 0].tolist()) == [0, 1, 2, 3, 4, 5]
  assert (got[6:] == -1).all()


def test_threshold_reads_blocks_at_or_above_it():
  got = _chosen(Selection(threshold=0.15))
  assert sorted(got[got >= 0].tolist()) == [0, 1, 3, 4, 5]
  assert _chosen(Selection(threshold=0.15, max_blocks=3)).tolist() == [0, 5, 1]
  got = _chosen(Selection(threshold=1.0))  # nothing passes: forced only
  assert sorted(got[got >= 0].tolist()) == [0, 5]


def test_ties_go_to_the_lower_block():
  probs = jnp.full((1, 1, 1, 5), 0.2)
  table = select_blocks(probs, POS, Selection(budget=32), 8, 8)
  assert np.asarray(table)[0, 0, 0].tolist() == [0, 5, 1, 2]


def test_bad_tables_raise():
  with pytest.raises(ValueError, match="num_blocks"):
    select_blocks(PROBS, POS, Selection(budget=32), 8, 4)
  with pytest.raises(TypeError, match="Selection"):
    select_blocks(PROBS, POS, 32, 8, 8)
