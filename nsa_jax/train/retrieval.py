"""Passkey (needle) retrieval accuracy of a language model."""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx
import jax.numpy as jnp
import numpy as np

from nsa_jax.data import synthetic
from nsa_jax.train import steps


def passkey_accuracy(model: nnx.Module, seq_len: int, depth: float, *,
                     samples: int = 8, seed: int = 0,
                     batch_size: int = 4) -> float:
  """Share of passkey examples whose every key digit is predicted greedily.

  Predictions are teacher-forced argmaxes at the digit positions, which
  equals greedy decoding of the key when all digits are right.

  Args:
    model: ``model(int32 [B, T]) -> logits [B, T, V]``.
    seq_len: T of the examples.
    depth: needle position in [0, 1].
    samples: examples drawn from ``(seed, seq_len, depth)``.
    seed: base seed.
    batch_size: examples per forward pass.

  Returns:
    Accuracy in [0, 1].
  """
  rng = np.random.default_rng([seed, seq_len, int(round(depth * 1000))])
  examples = [synthetic.passkey_example(rng, seq_len, depth)
              for _ in range(samples)]
  correct = 0
  for i in range(0, samples, batch_size):
    batch = synthetic.stack_examples(examples[i:i + batch_size])
    predicted = np.asarray(steps.predict_step(model,
                                              jnp.asarray(batch["inputs"])))
    hits = (predicted == batch["targets"]) | (batch["mask"] == 0)
    correct += int(hits.all(axis=1).sum())
  return correct / samples


def accuracy_grid(model: nnx.Module, lengths: Sequence[int],
                  depths: Sequence[float], **kwargs) -> np.ndarray:
  """float [len(depths), len(lengths)] of ``passkey_accuracy``."""
  return np.array([[passkey_accuracy(model, t, d, **kwargs) for t in lengths]
                   for d in depths])
