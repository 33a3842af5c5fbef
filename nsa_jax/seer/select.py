"""Block tables from gate probabilities: token budget or threshold."""

from __future__ import annotations

import jax.numpy as jnp

from nsa_jax.decode import attention as attn_lib
from nsa_jax.seer.config import Selection


def select_blocks(probs, positions, selection: Selection, block_size: int,
                  num_blocks: int, *, impl: str = "xla"):
  """The blocks each query reads, by ``selection``.

  Block 0 and the query's own block ``t // b`` are always chosen; then, by
  budget, the highest gate probabilities among the other causal blocks fill
  the remaining slots, or, by threshold, every such block whose probability
  reaches it (highest first, up to ``max_blocks``). Ties go to the lower
  index. This is ``nsa_jax.selection.forced_top_n`` with one initial and
  one local block: the rule NSA's selection uses.

  Args:
    probs: float [B, Q, Hkv, N] gate probabilities of blocks ``j < t // b``
      (0 elsewhere), N <= num_blocks.
    positions: int [B, Q] query positions.
    selection: budget or threshold.
    block_size: b.
    num_blocks: blocks the keys split into; ``t // b < num_blocks``.
    impl: "pallas" (or "auto" on a GPU) ranks one-query steps with the
      Pallas decode top-n kernel; otherwise XLA's ``forced_top_n``.

  Returns:
    int32 [B, Q, Hkv, n] with n = ``selection.num_slots(b, num_blocks)``:
    forced blocks first, then the chosen ones, -1 in spare slots, no
    repeats. With a budget of at least the causal blocks, every causal
    block (dense attention).

  Raises:
    ValueError: a budget below two blocks, or more scored blocks than
      ``num_blocks``.
  """
  if not isinstance(selection, Selection):
    raise TypeError(f"selection must be a Selection, got {selection!r}")
  if probs.shape[-1] > num_blocks:
    raise ValueError(f"probs score {probs.shape[-1]} blocks, more than "
                     f"num_blocks={num_blocks}")
  slots = selection.num_slots(block_size, num_blocks)
  scores = jnp.pad(probs.astype(jnp.float32),
                   [(0, 0)] * 3 + [(0, num_blocks - probs.shape[-1])])
  if selection.threshold is not None:
    scores = jnp.where(scores >= selection.threshold, scores, -jnp.inf)
  return attn_lib.decode_top_n(scores, positions, block_size=block_size,
                              num_selected=slots, num_initial=1,
                              num_local=1, impl=impl)
