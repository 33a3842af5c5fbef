"""SeerAttention-R decoding: the K-compression cache and one gated step.

A layer's ``SeerCache`` holds the dense cache (keys after RoPE, values) plus
the gate's state: ``k_gate``, the gate key of every complete block (pooled,
projected, RoPE at the block's first position: the "K compression cache"),
and ``k_open``, the raw keys (before RoPE) of the open block, from which its
gate key is made the step it completes. The prompt is prefilled densely
(``nsa_jax.decode.layers.full_prefill``); each decode step scores the
complete blocks before the query's own with the gate, picks blocks by
``Selection`` (block 0 and the own block always) and attends to them through
``nsa_jax.decode.attention.block_sparse_attend``: the block-sparse decode
kernel NSA's selected branch uses.
"""

from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp

from nsa_jax.decode import attention as attn_lib
from nsa_jax.decode import cache as cache_lib
from nsa_jax.decode import layers as layers_lib
from nsa_jax.modules.rope import apply_rope
from nsa_jax.seer.config import Selection
from nsa_jax.seer.gate import AttnGate
from nsa_jax.seer.gate import block_logits
from nsa_jax.seer.select import select_blocks
from nsa_jax.xla import masked_softmax


@struct.dataclass
class SeerCache:
  """Decode state of one full-attention layer with an AttnGate.

  Attributes:
    k: [B, S, Hkv, D] keys after RoPE; S is ``max_length`` rounded up to a
      multiple of b (whole blocks for the decode kernel).
    v: [B, S, Hkv, D] values.
    k_open: [B, b, Hkv, D] ring of the newest b raw keys (before RoPE):
      slot ``p mod b`` holds position p, so the open block's keys sit in
      their slots.
    k_gate: float32 [B, S / b, Hkv, d_gate] gate keys; entry j is valid once
      block j is complete (``(j + 1) * b <= lengths``).
    lengths: int32 [B], valid tokens per row.
    max_length: capacity (static).
  """

  k: jax.Array
  v: jax.Array
  k_open: jax.Array
  k_gate: jax.Array
  lengths: jax.Array
  max_length: int = struct.field(pytree_node=False)

  @classmethod
  def create(cls, batch: int, max_length: int, num_kv_heads: int,
             head_dim: int, block_size: int, gate_dim: int,
             dtype=jnp.float32) -> SeerCache:
    """An empty cache of ``max_length`` tokens a row."""
    full = cache_lib.FullCache.create(batch, max_length, num_kv_heads,
                                      head_dim, dtype)  # checks the sizes
    size = -(-max_length // block_size) * block_size
    pad = lambda x: jnp.pad(x, [(0, 0), (0, size - max_length), (0, 0),
                                (0, 0)])
    return cls(k=pad(full.k), v=pad(full.v),
               k_open=jnp.zeros((batch, block_size, num_kv_heads, head_dim),
                                dtype),
               k_gate=jnp.zeros((batch, size // block_size, num_kv_heads,
                                 gate_dim), jnp.float32),
               lengths=full.lengths, max_length=max_length)

  @property
  def block_size(self) -> int:
    return self.k_open.shape[1]

  def dense(self) -> cache_lib.FullCache:
    """The keys and values as a dense ``FullCache``."""
    return cache_lib.FullCache(k=self.k, v=self.v, lengths=self.lengths,
                               max_length=self.max_length)

  def overflowed(self):
    """bool [B]: rows written past ``max_length`` (only possible under jit)."""
    return self.lengths > self.max_length


def _check_gate(layer, gate: AttnGate, cache: SeerCache):
  if (gate.num_heads, gate.num_kv_heads, gate.head_dim) != (
      layer.num_heads, layer.num_kv_heads, layer.head_dim):
    raise ValueError("the gate was made for another layer shape: "
                     f"{gate.num_heads}/{gate.num_kv_heads} heads of "
                     f"{gate.head_dim}, the layer has {layer.num_heads}/"
                     f"{layer.num_kv_heads} of {layer.head_dim}")
  if cache.block_size != gate.config.block_size:
    raise ValueError(f"the cache holds blocks of {cache.block_size}, the "
                     f"gate scores blocks of {gate.config.block_size}")


def init_cache(layer, gate: AttnGate, batch: int, max_length: int, *,
               dtype=None) -> SeerCache:
  """An empty SeerCache for a FullAttention ``layer`` and its gate."""
  return SeerCache.create(
      batch, max_length, layer.num_kv_heads, layer.head_dim,
      gate.config.block_size, gate.config.gate_dim,
      dtype=dtype or layer.q_proj.dtype or layer.q_proj.param_dtype)


def prefill(layer, gate: AttnGate, x, cache: SeerCache, lengths=None):
  """A prompt through dense attention, filling the cache and the gate keys.

  Args:
    layer: the FullAttention.
    gate: its AttnGate.
    x: [B, T, d_model], rows right-padded.
    cache: from ``init_cache`` (its content is replaced).
    lengths: int [B] in [1, T], default T.

  Returns:
    (out [B, T, d_model], cache holding the prompts).

  Raises:
    CacheOverflowError: T > max_length.
  """
  _check_gate(layer, gate, cache)
  out, full = layers_lib.full_prefill(layer, x, cache.dense(), lengths)
  k = layers_lib.full_qkv(layer, x)[1]  # [B, T, Hkv, D] before RoPE
  k_gate = jax.lax.dynamic_update_slice_in_dim(cache.k_gate, gate.keys(k), 0,
                                               axis=1)
  return out, cache.replace(
      k=full.k, v=full.v, lengths=full.lengths, k_gate=k_gate,
      k_open=cache_lib.fill_ring(cache.k_open, k, full.lengths))


def decode_attention(gate: AttnGate, q, q_rope, cache: SeerCache,
                     selection: Selection, *, impl: str = "auto"):
  """Gated block-sparse attention of a one-token step.

  Args:
    gate: the layer's AttnGate.
    q: [B, 1, Hq, D] the step's queries before RoPE.
    q_rope: [B, 1, Hq, D] the same after RoPE.
    cache: the layer's cache, already holding the step's token.
    selection: which blocks to read.
    impl: of ``block_sparse_attend`` ("auto": the Pallas kernel on a GPU).

  Returns:
    (out [B, 1, Hq, D] in q.dtype, NaN for rows past ``max_length``;
    table int32 [B, 1, Hkv, n]: the blocks read).
  """
  b = cache.block_size
  positions = cache.lengths[:, None] - 1  # [B, 1]
  logits, mask = block_logits(gate.queries(q, positions), cache.k_gate,
                              positions, b)
  probs, _ = masked_softmax(logits, mask)
  table = select_blocks(probs, positions, selection, b, cache.k.shape[1] // b,
                        impl=impl)
  out = attn_lib.block_sparse_attend(q_rope, cache.k, cache.v, table,
                                     cache.lengths, block_size=b, impl=impl)
  return attn_lib.poison_overflow(out, cache), table


def decode_step(layer, gate: AttnGate, x, cache: SeerCache,
                selection: Selection, *, impl: str = "auto"):
  """The next token of every row: write it, update the gate keys, attend.

  Args:
    layer: the FullAttention.
    gate: its AttnGate.
    x: [B, 1, d_model], the tokens at positions ``lengths``.
    cache: the layer's SeerCache.
    selection: which blocks to read.
    impl: of the block-sparse attention.

  Returns:
    (out [B, 1, d_model], cache holding the new token).

  Raises:
    ValueError: more than one token per row.
    CacheOverflowError: a concrete row would pass max_length.
  """
  _check_gate(layer, gate, cache)
  if x.ndim != 3 or x.shape[1] != 1:
    raise ValueError(f"SeerAttention-R decodes one token a step: x must be "
                     f"[B, 1, d_model], got {x.shape}")
  if x.shape[0] != cache.lengths.shape[0]:
    raise ValueError(f"x has batch {x.shape[0]}, the cache "
                     f"{cache.lengths.shape[0]} rows (init_cache's batch)")
  cache_lib.check_capacity(cache.lengths, 1, cache.max_length, "decode_step")
  b = cache.block_size
  positions = cache.lengths[:, None]  # [B, 1]
  q, k, v = layers_lib.full_qkv(layer, x)
  q_rope = apply_rope(q, positions, layer.rope_base)
  k_open = cache_lib.write(cache.k_open, k, positions, ring=True)
  # The block this token completes gets its gate key; other rows drop it.
  start = (positions // b) * b  # [B, 1]
  done = positions + 1 == start + b
  index = jnp.where(done, positions // b, cache.k_gate.shape[1])
  k_gate = cache_lib.write(cache.k_gate, gate.keys(k_open, start[:, 0]),
                           index)
  cache = cache.replace(
      k=cache_lib.write(cache.k, apply_rope(k, positions, layer.rope_base),
                        positions),
      v=cache_lib.write(cache.v, v, positions), k_open=k_open, k_gate=k_gate,
      lengths=cache.lengths + 1)
  out, _ = decode_attention(gate, q, q_rope, cache, selection, impl=impl)
  return layer.out_proj(out.reshape(x.shape[0], 1, -1)), cache
