"""Helpers of the SeerAttention-R tests: a tiny full-attention LM and gates."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.modules import LMConfig
from nsa_jax.modules import TransformerLM
from nsa_jax.seer.config import SeerConfig
from nsa_jax.seer.gate import SeerGates
from nsa_jax.seer.model import SeerLM

VOCAB = 64
SEER = SeerConfig(block_size=16, gate_dim=8)


def random_module(module_fn, seed=0):
  """The module with every parameter drawn by numpy: matrices N(0, 1/fan-in),
  vectors (norm scales) 1 + N(0, 0.09). Activations and logits are O(1),
  where a tolerance test means something; numpy draws skip compiling a
  random initialiser per parameter shape."""
  module = nnx.eval_shape(module_fn)
  state = nnx.state(module, nnx.Param)
  rng = np.random.default_rng(seed)

  def draw(x):
    noise = rng.normal(size=x.shape)
    if x.ndim >= 2:  # [in, out], or the gates' [Hkv, ..., out] per head
      fan_in = x.shape[0] if x.ndim == 2 else np.prod(x.shape[1:-1])
      return jnp.asarray(noise / np.sqrt(fan_in), x.dtype)
    return jnp.asarray(1.0 + 0.3 * noise, x.dtype)

  nnx.update(module, jax.tree.map(draw, state))
  return module


def make_lm(selection=None, *, num_layers=2, seed=0, config=SEER, **fields):
  """A SeerLM over a random full-attention LM (Hq 4, Hkv 2, D 16)."""
  lm_config = LMConfig(vocab_size=VOCAB, d_model=32, num_layers=num_layers,
                       num_heads=4, num_kv_heads=2, head_dim=16,
                       mlp_hidden=64, attention="full", **fields)
  model = random_module(
      lambda: TransformerLM(lm_config, rngs=nnx.Rngs(0)), seed)
  gates = random_module(
      lambda: SeerGates(lm_config, config, rngs=nnx.Rngs(0)), seed + 1)
  return SeerLM(model, gates, selection, impl="xla")


def tokens(batch, seq_len, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, VOCAB, (batch, seq_len)), jnp.int32)
