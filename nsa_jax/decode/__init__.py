"""Incremental decoding: KV caches, decode-time attention, generation.

``cache``: NSACache / FullCache pytrees. ``attention``: the decode math in
XLA, including ``block_sparse_decode`` for any block table. ``layers``: the
prefill and decode steps behind ``NSAAttention``, ``FullAttention`` and
``TransformerLM``'s ``init_cache`` / ``prefill`` / ``decode_step``.
``generate``: a jit-compiled sampling loop (greedy, temperature, top-k,
top-p, stop tokens, per-row stopping).
"""

from nsa_jax.decode.attention import block_sparse_decode
from nsa_jax.decode.attention import full_decode
from nsa_jax.decode.attention import nsa_decode
from nsa_jax.decode.attention import query_positions
from nsa_jax.decode.cache import CacheOverflowError
from nsa_jax.decode.cache import FullCache
from nsa_jax.decode.cache import NSACache
from nsa_jax.decode.generate import generate
from nsa_jax.decode.generate import Generation
from nsa_jax.decode.generate import sample_logits
from nsa_jax.decode.generate import SamplingConfig

__all__ = ["CacheOverflowError", "FullCache", "Generation", "NSACache",
           "SamplingConfig", "block_sparse_decode", "full_decode", "generate",
           "nsa_decode", "query_positions", "sample_logits"]
