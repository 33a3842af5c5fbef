"""Generation: greedy equals argmax of the full forward, sampling, stopping."""

from decode_testing import forward
from decode_testing import make_model
from decode_testing import make_tokens
from decode_testing import VOCAB
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.decode import CacheOverflowError
from nsa_jax.decode.generate import generate
from nsa_jax.decode.generate import sample_logits
from nsa_jax.decode.generate import SamplingConfig

GREEDY = SamplingConfig.greedy()


def _argmax_of_full_forward(model, prompt, generated):
  """Argmax of the full forward over prompt + generated, at each new token.

  Greedy decoding is right iff token i is the argmax after tokens < i.
  """
  seq = jnp.concatenate([prompt, jnp.asarray(generated)], axis=1)
  logits = forward(model, seq)[:, prompt.shape[1] - 1:-1]
  return np.asarray(jnp.argmax(logits, axis=-1))


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_greedy_generation_equals_argmax_of_the_full_forward(attention):
  model = make_model(attention)
  prompt = make_tokens(1, 6, seed=4)
  out = generate(model, prompt, max_new_tokens=14, sampling=GREEDY)
  want = _argmax_of_full_forward(model, prompt, out.tokens)
  np.testing.assert_array_equal(out.tokens, want)
  np.testing.assert_array_equal(out.num_generated, [14])
  assert not bool(out.stopped[0])


def test_rows_of_different_lengths_generate_as_alone():
  model = make_model()
  lengths = [3, 9]
  prompt = make_tokens(2, 9, seed=7)
  out = generate(model, prompt, lengths=lengths, max_new_tokens=10,
                 sampling=GREEDY)
  for i, n in enumerate(lengths):
    alone = generate(model, prompt[i:i + 1, :n], max_new_tokens=10,
                     sampling=GREEDY)
    np.testing.assert_array_equal(out.tokens[i], alone.tokens[0])


def test_sampling_is_reproducible_under_a_seed():
  model = make_model()
  prompt = make_tokens(2, 5, seed=1)
  sampling = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)
  run = lambda seed: np.asarray(generate(
      model, prompt, max_new_tokens=12, sampling=sampling, seed=seed).tokens)
  first, again, other = run(0), run(0), run(1)
  np.testing.assert_array_equal(first, again)
  assert (first != other).any()


def test_stop_tokens_stop_each_row_on_its_own():
  model = make_model()
  prompt = make_tokens(2, 5, seed=2)
  free = np.asarray(generate(model, prompt, max_new_tokens=12,
                             sampling=GREEDY).tokens)
  stop = int(free[0, 3])
  out = generate(model, prompt, max_new_tokens=12, sampling=GREEDY,
                 stop_tokens=(stop,), pad_id=VOCAB - 1)
  for row in range(2):
    hits = np.nonzero(free[row] == stop)[0]
    count = int(hits[0]) + 1 if hits.size else 12
    assert int(out.num_generated[row]) == count
    assert bool(out.stopped[row]) == bool(hits.size)
    np.testing.assert_array_equal(out.tokens[row, :count], free[row, :count])
    assert (np.asarray(out.tokens[row, count:]) == VOCAB - 1).all()


def test_more_new_tokens_than_the_cache_holds_is_an_error():
  model = make_model()
  prompt = make_tokens(2, 8)
  with pytest.raises(CacheOverflowError, match="row 0 holds 8.*max_length=12"):
    generate(model, prompt, max_new_tokens=5, max_length=12)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, prompt, max_new_tokens=0)
  with pytest.raises(ValueError, match="outside"):
    generate(model, prompt, max_new_tokens=2, stop_tokens=(VOCAB,))


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.15, 0.1]] * 4000))
  keys = jax.random.key(0)
  draw = lambda s: np.asarray(sample_logits(logits, keys, s))
  assert set(draw(SamplingConfig(top_k=2)).tolist()) == {1, 2}
  # p = 0.8: tokens 1, 2, 3 reach 0.85; 4 and 0 are out.
  counts = np.bincount(draw(SamplingConfig(top_p=0.8)), minlength=5)
  assert counts[0] == counts[4] == 0 and (counts[1:4] > 0).all()
  assert abs(counts[1] / counts.sum() - 0.4 / 0.85) < 0.03
  np.testing.assert_array_equal(draw(SamplingConfig(top_p=1e-6)), 1)
  np.testing.assert_array_equal(draw(GREEDY), 1)
  # Plain sampling at temperature 1 follows the probabilities.
  freq = np.bincount(draw(SamplingConfig()), minlength=5) / 4000
  np.testing.assert_allclose(freq, [0.05, 0.4, 0.3, 0.15, 0.1], atol=0.03)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0),
                                 dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings_are_errors(bad):
  with pytest.raises(ValueError, match="SamplingConfig"):
    SamplingConfig(**bad)
