"""The passkey scorer compares the predictions at the key digits."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import train
from nsa_jax.data import tokenizer


class _Shifted(nnx.Module):
  """Logits for ``inputs[t + shift]``: shift 1 is the true next token of
  every position but the last (whose target, the final ".", is unscored)."""

  def __init__(self, shift: int, wrong_digit: int | None = None):
    self.shift, self.wrong_digit = shift, wrong_digit

  def __call__(self, inputs):
    guess = jnp.roll(inputs, -self.shift, axis=1)
    if self.wrong_digit is not None:  # this key digit predicted as "x"
      t = inputs.shape[1] - 6 + self.wrong_digit  # the last 6 targets: key "."
      guess = guess.at[:, t].set(ord("x"))
    return jax.nn.one_hot(guess, tokenizer.VOCAB_SIZE)


def test_a_model_predicting_every_next_token_retrieves_every_key():
  hits = train.hits_grid(_Shifted(1), [128, 200], [0.0, 1.0], samples=3)
  assert hits.shape == (2, 2, 3, 5) and hits.all()
  assert train.passkey_accuracy(_Shifted(1), 160, 0.5, samples=5) == 1.0


def test_a_model_one_position_off_retrieves_nothing():
  assert not train.passkey_hits(_Shifted(0), 128, 0.5, samples=4).any()
  assert train.accuracy_grid(_Shifted(2), [128], [0.3]).max() == 0.0


def test_one_wrong_digit_fails_the_example_but_not_the_other_digits():
  hits = train.passkey_hits(_Shifted(1, wrong_digit=2), 150, 0.7, samples=6)
  np.testing.assert_array_equal(hits.mean(0), [1, 1, 0, 1, 1])
  assert train.passkey_accuracy(_Shifted(1, wrong_digit=2), 150, 0.7) == 0.0
