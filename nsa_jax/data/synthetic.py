"""Synthetic long-context tasks: passkey (needle) retrieval and MQAR.

Every example is one byte-level sequence ``tokens`` of ``seq_len + 1`` tokens;
a model reads ``tokens[:-1]`` and is scored on ``tokens[1:]`` where ``mask`` is
1, i.e. only on the answer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nsa_jax.data import tokenizer

_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "The river runs to the sea.",
    "Birds sing in the morning.",
    "A quiet wind moves the trees.",
)
_QUESTION = " What is the pass key? The pass key is "


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


def _filler(rng: np.random.Generator, length: int) -> str:
  """``length`` characters of repeated filler sentences in random order."""
  out, size = [], 0
  while size < length:
    sentence = " " + _FILLER[rng.integers(len(_FILLER))]
    out.append(sentence)
    size += len(sentence)
  return "".join(out)[:length]


def passkey_overhead(num_digits: int = 5) -> int:
  """Tokens a passkey example needs beyond the filler."""
  key = "0" * num_digits
  return len(_needle(key)) + len(_QUESTION) + num_digits + 1


def _needle(key: str) -> str:
  return f" The pass key is {key}. Remember it. {key} is the pass key."


def passkey_example(rng: np.random.Generator, seq_len: int, depth: float,
                    num_digits: int = 5) -> Example:
  """A passkey hidden in filler text at ``depth``, asked for at the end.

  Layout: ``filler[:a] needle filler[a:] question key "."`` with
  ``a = round(depth * len(filler))``; only the key's digits are scored.

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
  overhead = passkey_overhead(num_digits)
  if seq_len + 1 <= overhead:
    raise ValueError(
        f"seq_len={seq_len} is too short for a passkey example, which needs "
        f"more than {overhead - 1} tokens")
  key = "".join(str(d) for d in rng.integers(0, 10, size=num_digits))
  filler = _filler(rng, seq_len + 1 - overhead)
  cut = int(round(depth * len(filler)))
  prompt = filler[:cut] + _needle(key) + filler[cut:] + _QUESTION
  tokens = tokenizer.encode(prompt + key + ".").astype(np.int32)
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
