"""Tests that data iterators are deterministic and resumable."""

import json

import chex
import numpy as np
import pytest

from nsa_jax import data


def _stream(n=1000):
  return np.random.default_rng(0).integers(0, 256, n).astype(np.uint8)


def _iterators():
  return {
      "packed": lambda seed: data.PackedIterator(_stream(), 3, 16, seed=seed),
      "passkey": lambda seed: data.SyntheticIterator("passkey", 2, 128,
                                                     seed=seed),
      "mqar": lambda seed: data.SyntheticIterator("mqar", 2, 64, seed=seed,
                                                  num_pairs=4),
      "mixed": lambda seed: data.MixedIterator(
          data.PackedIterator(_stream(), 3, 128, seed=seed),
          data.SyntheticIterator("passkey", 1, 128, seed=seed), 1),
  }


@pytest.mark.parametrize("kind", ["packed", "passkey", "mqar", "mixed"])
def test_deterministic_and_resumable(kind):
  make = _iterators()[kind]
  a, b = make(7), make(7)
  first = [next(a) for _ in range(5)]
  chex.assert_trees_all_equal(first, [next(b) for _ in range(5)])
  assert not np.array_equal(first[0]["inputs"], next(make(8))["inputs"])
  batch = first[0]
  assert batch["inputs"].dtype == np.int32
  assert batch["inputs"].shape == batch["targets"].shape
  assert batch["mask"].shape == batch["inputs"].shape

  resumed = make(7)
  for _ in range(2):
    next(resumed)
  state = json.loads(json.dumps(resumed.state()))  # survives JSON
  fresh = make(7)
  fresh.restore(state)
  chex.assert_trees_all_equal(first[2:], [next(fresh) for _ in range(3)])


def test_packed_epoch_visits_every_window_once():
  stream = np.arange(161) % 256
  it = data.PackedIterator(stream, batch_size=2, seq_len=16, seed=0)
  assert it.num_windows == 10
  starts = [row[0] for _ in range(5) for row in next(it)["inputs"]]
  assert sorted(starts) == list(range(0, 160, 16))
  row = it.batch_at(0)
  np.testing.assert_array_equal(row["inputs"][:, 1:], row["targets"][:, :-1])


def test_restore_rejects_other_iterator():
  state = data.PackedIterator(_stream(), 3, 16, seed=1).state()
  with pytest.raises(ValueError, match="does not match"):
    data.PackedIterator(_stream(), 3, 16, seed=2).restore(state)
  with pytest.raises(ValueError, match="bad step"):
    data.PackedIterator(_stream(), 3, 16, seed=1).restore(
        {**state, "step": -1})


def test_eval_batches_are_fixed():
  first = data.eval_batches(_stream(), 2, 16, 3)
  chex.assert_trees_all_equal(first, data.eval_batches(_stream(), 2, 16, 3))
  assert len(first) == 3 and first[0]["inputs"].shape == (2, 16)
  with pytest.raises(ValueError, match="shorter than one window"):
    data.eval_batches(_stream(10), 2, 16, 1)


def test_bad_sizes():
  with pytest.raises(ValueError, match="no window"):
    data.PackedIterator(_stream(10), 1, 16)
  with pytest.raises(ValueError, match="unknown synthetic task"):
    data.SyntheticIterator("sorting", 1, 64)
  with pytest.raises(ValueError, match="too short"):
    data.SyntheticIterator("passkey", 1, 32)
