"""Incremental decoding: KV caches, decode-time attention, generation.

``cache``: NSACache / FullCache pytrees. ``attention``: the decode math in
XLA, including ``block_sparse_decode`` for any block table. ``layers``: the
prefill and decode steps behind ``NSAAttention``, ``FullAttention`` and
``TransformerLM``'s ``init_cache`` / ``prefill`` / ``decode_step``.
"""

from nsa_jax.decode.attention import block_sparse_decode
from nsa_jax.decode.attention import full_decode
from nsa_jax.decode.attention import nsa_decode
from nsa_jax.decode.attention import query_positions
from nsa_jax.decode.cache import CacheOverflowError
from nsa_jax.decode.cache import FullCache
from nsa_jax.decode.cache import NSACache

__all__ = ["CacheOverflowError", "FullCache", "NSACache",
           "block_sparse_decode", "full_decode", "nsa_decode",
           "query_positions"]
