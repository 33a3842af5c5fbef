"""Tiny models shared by the training tests."""

from flax import nnx
import pytest

from nsa_jax import NSAConfig
from nsa_jax.modules import LMConfig
from nsa_jax.modules import TransformerLM


def tiny_lm(attention: str = "full", seed: int = 0,
            d_model: int = 32) -> TransformerLM:
  cfg = LMConfig(vocab_size=256, d_model=d_model, num_layers=1, num_heads=2,
                 num_kv_heads=1, head_dim=16, mlp_hidden=64,
                 attention=attention, nsa=NSAConfig.tiny())
  return TransformerLM(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(name="make_lm")
def fixture_make_lm():
  return tiny_lm
