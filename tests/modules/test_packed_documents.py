"""Packed rows: a row of documents gives each document's solo outputs."""

import dataclasses

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.modules.transformer import LMConfig
from nsa_jax.modules.transformer import TransformerLM

from nsa_cases import TINY

# Documents start at multiples of l' = 16 (so the block grids of a document
# alone and in the row agree); the last one is shorter than l = 8 and sees
# no compressed token.
LENGTHS = (16, 21, 5)
CONFIG = LMConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=8, mlp_hidden=64, nsa=TINY,
                  impl="reference")


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_packed_row_equals_documents_alone(attention):
  """Row 0 packs the documents; row j + 1 holds document j alone at its
  start (what follows it is in its future: causality alone hides it).
  One call, so one compilation."""
  model = TransformerLM(dataclasses.replace(CONFIG, attention=attention),
                        rngs=nnx.Rngs(0))
  seq_len = sum(LENGTHS)
  packed = jax.random.randint(jax.random.key(1), (seq_len,), 0, 64)
  starts = np.cumsum((0,) + LENGTHS[:-1])
  alone = [jnp.roll(packed, -s) for s in starts]
  tokens = jnp.stack([packed] + alone)
  ids = np.zeros((1 + len(LENGTHS), seq_len), np.int32)
  ids[0] = np.repeat(np.arange(len(LENGTHS)), LENGTHS) + 3
  logits = model(tokens, segment_ids=jnp.asarray(ids))
  for j, (start, length) in enumerate(zip(starts, LENGTHS)):
    chex.assert_trees_all_close(logits[0, start:start + length],
                                logits[j + 1, :length], atol=2e-5, rtol=2e-5)


def test_segment_ids_are_checked():
  model = TransformerLM(CONFIG, rngs=nnx.Rngs(0))
  tokens = jnp.zeros((1, 20), jnp.int32)
  with pytest.raises(ValueError, match="segment_ids.shape"):
    model(tokens, segment_ids=jnp.zeros((1, 19), jnp.int32))
  with pytest.raises(TypeError, match="integer"):
    model(tokens, segment_ids=jnp.zeros((1, 20), jnp.float32))
