"""Helpers of the SeerAttention-R tests: a tiny full-attention LM and gates."""

from flax import nnx
import jax
import jax.numpy as jnp

from nsa_jax.modules import LMConfig
from nsa_jax.modules import TransformerLM
from nsa_jax.seer.config import SeerConfig
from nsa_jax.seer.gate import SeerGates
from nsa_jax.seer.model import SeerLM

VOCAB = 64
SEER = SeerConfig(block_size=16, gate_dim=8)


def make_lm(selection=None, *, num_layers=2, seed=0, config=SEER, **fields):
  """A SeerLM over a random 2-layer full-attention LM (Hq 4, Hkv 2, D 16).

  The embeddings are scaled up so activations and logits are O(1): a
  tolerance test against near-zero logits would prove little.
  """
  lm_config = LMConfig(vocab_size=VOCAB, d_model=32, num_layers=num_layers,
                       num_heads=4, num_kv_heads=2, head_dim=16,
                       mlp_hidden=64, attention="full", **fields)
  model = TransformerLM(lm_config, rngs=nnx.Rngs(seed))
  model.embed.embedding.value = model.embed.embedding.value * 50.0
  gates = SeerGates(lm_config, config, rngs=nnx.Rngs(seed + 1))
  return SeerLM(model, gates, selection, impl="xla")


def tokens(batch, seq_len, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, seq_len), 0, VOCAB,
                            jnp.int32)
