"""Tests of the synthetic passkey and MQAR tasks."""

import re

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


def _allowed_sentences(key):
  return set(data.synthetic._FILLER) | {  # pylint: disable=protected-access
      f"The pass key is {key}.", "Remember it.", f"{key} is the pass key.",
      "What is the pass key?"}


@pytest.mark.parametrize("seq_len", [110, 128, 131, 257, 1000])
def test_passkey_text_is_whole_sentences(seq_len):
  """No cut sentences, double spaces or '..': only known whole sentences."""
  for seed in range(6):
    for depth in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
      ex = data.passkey_example(np.random.default_rng(seed), seq_len, depth)
      text = data.decode(ex.tokens)
      assert len(text) == seq_len + 1
      assert "  " not in text and ".." not in text and text == text.strip()
      sentences = re.findall(r"[^.?]+[.?]", text)
      assert "".join(sentences) == text
      assert all(s.startswith(" ") for s in sentences[1:])
      allowed = _allowed_sentences(ex.answer)
      bad = [s.strip() for s in sentences if s.strip() not in allowed]
      assert not bad, (text, bad)


def test_shortest_passkey_length_is_stated():
  with pytest.raises(ValueError, match="needs at least 110 tokens"):
    data.passkey_example(np.random.default_rng(0), 109, 0.5)
  data.passkey_example(np.random.default_rng(0), 110, 0.5)
