"""Checks that token ids index a vocabulary, where the ids are concrete.

Under ``jax.jit`` ids are traced and cannot be checked; ``TransformerLM``
then embeds an out-of-range id (negative or >= ``vocab_size``) as a zero
vector, which keeps every other position finite. These checks catch such ids
earlier, in the data pipeline and before generation, with the position.
"""

from __future__ import annotations

import numpy as np


def check_token_ids(tokens, vocab_size: int, *, what: str = "tokens") -> None:
  """Raises if any id is outside ``[0, vocab_size)``.

  Args:
    tokens: integer array of any shape (numpy, or a concrete jax array).
    vocab_size: V.
    what: the name used in the message.

  Raises:
    ValueError: a non-integer array, or an id < 0 or >= V; the message names
      the first bad id and its position (index tuple).
  """
  ids = np.asarray(tokens)
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{what} must be integer token ids, got {ids.dtype}")
  bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
  if bad.size:
    position = np.unravel_index(bad[0], ids.shape)
    more = f" and {bad.size - 1} more" if bad.size > 1 else ""
    raise ValueError(
        f"{what} holds token id {int(ids[position])} at position "
        f"{tuple(int(i) for i in position)}{more}; ids must lie in "
        f"[0, vocab_size={vocab_size})")
