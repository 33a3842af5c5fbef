"""Flax NNX modules: NSA attention, its compression function, a small LM."""

from nsa_jax.modules.attention import FullAttention
from nsa_jax.modules.attention import NSAAttention
from nsa_jax.modules.compression import BlockCompressor
from nsa_jax.modules.rope import apply_rope
from nsa_jax.modules.transformer import DecoderBlock
from nsa_jax.modules.transformer import LMConfig
from nsa_jax.modules.transformer import SwiGLU
from nsa_jax.modules.transformer import TransformerLM

__all__ = ["BlockCompressor", "DecoderBlock", "FullAttention", "LMConfig",
           "NSAAttention", "SwiGLU", "TransformerLM", "apply_rope"]
