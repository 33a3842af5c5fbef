"""Tests of the synthetic passkey and MQAR tasks."""

import numpy as np
import pytest

from nsa_jax import data


@pytest.mark.parametrize("seq_len", [128, 300])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_layout(seq_len, depth):
  ex = data.passkey_example(np.random.default_rng(1), seq_len, depth)
  assert ex.tokens.shape == (seq_len + 1,) and ex.tokens.dtype == np.int32
  assert ex.mask.shape == (seq_len,) and ex.mask.sum() == 5
  targets = ex.tokens[1:]
  assert data.decode(targets[ex.mask == 1]) == ex.answer
  text = data.decode(ex.tokens)
  assert text.endswith(f"The pass key is {ex.answer}.")
  needle = text.index(f"The pass key is {ex.answer}. Remember")
  position = needle / (seq_len - data.synthetic.passkey_overhead())
  assert abs(position - depth) < 0.1


def test_passkey_errors():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="too short"):
    data.passkey_example(rng, 60, 0.5)
  with pytest.raises(ValueError, match="depth"):
    data.passkey_example(rng, 200, 1.5)


def test_mqar_targets_are_values_of_queried_keys():
  ex = data.mqar_example(np.random.default_rng(3), 128, num_pairs=8,
                         num_queries=6)
  pairs = dict(zip(ex.tokens[0:16:2], ex.tokens[1:16:2]))
  assert len(pairs) == 8
  positions = np.flatnonzero(ex.mask)
  assert positions.size == 6
  for pos in positions:
    assert ex.tokens[pos + 1] == pairs[ex.tokens[pos]]
  with pytest.raises(ValueError, match="too short"):
    data.mqar_example(np.random.default_rng(0), 20, num_pairs=8)
