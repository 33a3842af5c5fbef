"""Synthetic long-context tasks: passkey (needle) retrieval and MQAR.

Every example is one byte-level sequence ``tokens`` of ``seq_len + 1`` tokens;
a model reads ``tokens[:-1]`` and is scored on ``tokens[1:]`` where ``mask`` is
1, i.e. only on the answer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nsa_jax.data import tokenizer

# Whole sentences of many lengths. Every length from _SHORTEST to
# 2 * _SHORTEST - 1 (a sentence and the space after it) occurs, so any
# stretch of at least _SHORTEST characters is filled exactly (``_filler``).
_FILLER = (
    "Go now.", "Look up.", "It rains.",
    "Owls hoot.", "Here we go.", "Time passes.", "Snow is cold.",
    "Fish can swim.", "Frogs can jump.", "The sky is blue.",
    "Leaves turn gold.", "The sun is yellow.", "The grass is green.",
    "There and back again.", "The river runs to the sea.",
    "Birds sing in the morning.", "A quiet wind moves the trees.",
)
_SHORTEST = min(len(f) for f in _FILLER) + 1
_BY_SIZE = {len(f) + 1: f for f in _FILLER}
_QUESTION = "What is the pass key? The pass key is "


@dataclasses.dataclass(frozen=True)
class Example:
  """One task instance.

  Attributes:
    tokens: int32 [seq_len + 1], inputs are ``tokens[:-1]``.
    mask: float32 [seq_len], 1 where ``tokens[1:]`` is scored.
    answer: the expected answer as text (passkey) or values (MQAR).
  """

  tokens: np.ndarray
  mask: np.ndarray
  answer: str


def _filler(rng: np.random.Generator, size: int) -> list[str]:
  """Random whole sentences whose lengths plus one space each sum to ``size``.

  ``size`` must be 0 or at least ``_SHORTEST``.
  """
  out = []
  while size:
    if size < 2 * _SHORTEST:  # one exact sentence ends it
      choice = _BY_SIZE[size]
    else:
      fits = [f for f in _FILLER if len(f) + 1 <= size - _SHORTEST]
      choice = fits[rng.integers(len(fits))]
    out.append(choice)
    size -= len(choice) + 1
  return out


def _needle(key: str) -> str:
  return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_overhead(num_digits: int = 5) -> int:
  """Tokens of a passkey example that are not filler."""
  key = "0" * num_digits
  return len(_needle(key)) + 1 + len(_QUESTION) + num_digits + 1


def _split(size: int, depth: float) -> int:
  """Filler characters before the needle: near ``depth * size``, and both
  parts 0 or at least ``_SHORTEST`` long."""
  allowed = [0, size] + list(range(_SHORTEST, size - _SHORTEST + 1))
  return min(allowed, key=lambda b: (abs(b - depth * size), b))


def passkey_example(rng: np.random.Generator, seq_len: int, depth: float,
                    num_digits: int = 5) -> Example:
  """A passkey hidden in filler text at ``depth``, asked for at the end.

  Layout: ``filler needle filler question key "."``, whole sentences
  separated by single spaces; the filler before the needle holds about
  ``depth`` of all filler text (split between sentences). Only the key's
  digits are scored.

  Args:
    rng: numpy generator (key digits and filler order).
    seq_len: T, tokens the model reads.
    depth: needle position in [0, 1]: 0 at the start, 1 just before the
      question.
    num_digits: length of the random key.

  Returns:
    An ``Example`` whose ``answer`` is the key.

  Raises:
    ValueError: ``depth`` outside [0, 1] or ``seq_len`` too short.
  """
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  if num_digits < 1:
    raise ValueError(f"num_digits must be >= 1, got {num_digits}")
  size = seq_len + 1 - passkey_overhead(num_digits)
  if size < _SHORTEST:
    raise ValueError(
        f"seq_len={seq_len} is too short for a passkey example, which needs "
        f"at least {seq_len - size + _SHORTEST} tokens")
  key = "".join(str(d) for d in rng.integers(0, 10, size=num_digits))
  before = _split(size, depth)
  sentences = (_filler(rng, before) + [_needle(key)]
               + _filler(rng, size - before) + [_QUESTION + key + "."])
  text = " ".join(sentences)
  prompt = text[:-num_digits - 1]
  tokens = tokenizer.encode(text).astype(np.int32)
  mask = np.zeros((seq_len,), np.float32)
  mask[len(prompt) - 1:len(prompt) - 1 + num_digits] = 1.0  # predicts digits
  return Example(tokens=tokens, mask=mask, answer=key)


def mqar_example(rng: np.random.Generator, seq_len: int, num_pairs: int = 16,
                 num_queries: int | None = None) -> Example:
  """Multi-query associative recall (Zoology): recall values of seen keys.

  Layout: ``k1 v1 ... kP vP`` then noise in which ``num_queries`` keys
  reappear, each followed by its value; the value after each queried key is
  scored. Keys use tokens [128, 192), values [192, 256), noise [32, 128).

  Args:
    rng: numpy generator.
    seq_len: T, tokens the model reads.
    num_pairs: P <= 64, distinct key-value pairs.
    num_queries: keys asked again, default P.

  Returns:
    An ``Example`` whose ``answer`` lists the queried values.

  Raises:
    ValueError: sizes that do not fit.
  """
  num_queries = num_pairs if num_queries is None else num_queries
  if not 1 <= num_pairs <= 64:
    raise ValueError(f"num_pairs must be in [1, 64], got {num_pairs}")
  if num_queries < 1:
    raise ValueError(f"num_queries must be >= 1, got {num_queries}")
  free = seq_len + 1 - 2 * num_pairs
  if free < 2 * num_queries:
    raise ValueError(
        f"seq_len={seq_len} is too short for {num_pairs} pairs and "
        f"{num_queries} queries (needs >= "
        f"{2 * num_pairs + 2 * num_queries - 1})")
  keys = rng.choice(np.arange(128, 192), size=num_pairs, replace=False)
  values = rng.integers(192, 256, size=num_pairs)
  tokens = np.empty((seq_len + 1,), np.int32)
  tokens[0:2 * num_pairs:2] = keys
  tokens[1:2 * num_pairs:2] = values
  tokens[2 * num_pairs:] = rng.integers(32, 128, size=free)
  # Queries sit on disjoint slot pairs of the free region.
  slots = np.sort(rng.choice(free // 2, size=num_queries, replace=False))
  asked = rng.integers(0, num_pairs, size=num_queries)
  mask = np.zeros((seq_len,), np.float32)
  for slot, pair in zip(slots, asked):
    pos = 2 * num_pairs + 2 * slot
    tokens[pos], tokens[pos + 1] = keys[pair], values[pair]
    mask[pos] = 1.0  # the target at ``pos`` is tokens[pos + 1], the value
  return Example(tokens=tokens, mask=mask,
                 answer=" ".join(str(v) for v in values[asked]))


def stack_examples(examples: list[Example]) -> dict[str, np.ndarray]:
  """Examples to a batch: inputs/targets int32 [B, T], mask float32 [B, T]."""
  tokens = np.stack([e.tokens for e in examples])
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "mask": np.stack([e.mask for e in examples]),
  }
