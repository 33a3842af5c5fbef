"""Passkey (needle) retrieval accuracy of a language model."""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx
import jax.numpy as jnp
import numpy as np

from nsa_jax.data import synthetic
from nsa_jax.train import steps


def passkey_hits(model: nnx.Module, seq_len: int, depth: float, *,
                 samples: int = 8, seed: int = 0, batch_size: int = 4,
                 num_digits: int = 5) -> np.ndarray:
  """Which key digits the model predicts, teacher-forced, per example.

  Digit ``i`` is predicted from the prompt and the true digits before it
  (the argmax at the position whose target is that digit).

  Args:
    model: ``model(int32 [B, T]) -> logits [B, T, V]``.
    seq_len: T of the examples.
    depth: needle position in [0, 1].
    samples: examples drawn from ``(seed, seq_len, depth)``.
    seed: base seed.
    batch_size: examples per forward pass.
    num_digits: key length.

  Returns:
    bool [samples, num_digits]: True where the digit is predicted.
  """
  rng = np.random.default_rng([seed, seq_len, int(round(depth * 1000))])
  examples = [synthetic.passkey_example(rng, seq_len, depth, num_digits)
              for _ in range(samples)]
  rows = []
  for i in range(0, samples, batch_size):
    batch = synthetic.stack_examples(examples[i:i + batch_size])
    predicted = np.asarray(steps.predict_step(model,
                                              jnp.asarray(batch["inputs"])))
    scored = batch["mask"] == 1  # num_digits per row, in order
    rows.append((predicted[scored] == batch["targets"][scored])
                .reshape(-1, num_digits))
  return np.concatenate(rows)


def passkey_accuracy(model: nnx.Module, seq_len: int, depth: float,
                     **kwargs) -> float:
  """Share of passkey examples whose every key digit is predicted greedily.

  Predictions are teacher-forced argmaxes at the digit positions, which
  equals greedy decoding of the key when all digits are right. ``kwargs``
  are those of ``passkey_hits``.

  Returns:
    Accuracy in [0, 1].
  """
  return float(passkey_hits(model, seq_len, depth, **kwargs).all(axis=1)
               .mean())


def hits_grid(model: nnx.Module, lengths: Sequence[int],
              depths: Sequence[float], **kwargs) -> np.ndarray:
  """bool [len(depths), len(lengths), samples, num_digits] of
  ``passkey_hits`` (``kwargs`` are its keywords).

  ``.all(-1).mean(-1)`` is the accuracy grid; ``.mean((0, 1, 2))`` the
  share of each key digit predicted, which tells a model that finds the
  needle but cannot copy the rest of the key (first digit right, later ones
  near chance) from one that finds nothing.
  """
  return np.array([[passkey_hits(model, t, d, **kwargs) for t in lengths]
                   for d in depths])


def accuracy_grid(model: nnx.Module, lengths: Sequence[int],
                  depths: Sequence[float], **kwargs) -> np.ndarray:
  """float [len(depths), len(lengths)] of ``passkey_accuracy``."""
  return hits_grid(model, lengths, depths, **kwargs).all(-1).mean(-1)
