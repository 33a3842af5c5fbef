"""A small decoder-only language model whose attention is NSA or dense."""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.config import NSAConfig
from nsa_jax.data.token_ids import check_token_ids
from nsa_jax.modules.attention import FullAttention
from nsa_jax.modules.attention import GATES
from nsa_jax.modules.attention import NSAAttention
from nsa_jax.modules.compression import COMPRESSIONS
from nsa_jax.validation import check_segment_ids
from nsa_jax.validation import IMPLS

ATTENTIONS = ("nsa", "full")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Vocabularies up to this size embed by one-hot matmul (TransformerLM._embed).
ONE_HOT_VOCAB = 1024
# Per-block rematerialisation (nnx.remat, i.e. jax.checkpoint, around each
# DecoderBlock): what the backward pass keeps of a block's forward.
REMAT_POLICIES = {
    "none": None,  # no remat: every activation is kept
    "block": jax.checkpoint_policies.nothing_saveable,  # the block's input
    # the input and matmul outputs without batch dims (the projections)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Shape of a TransformerLM; validated at construction.

  Attributes:
    vocab_size: tokens in the vocabulary.
    d_model: residual width.
    num_layers: decoder blocks.
    num_heads, num_kv_heads: Hq and Hkv (GQA), Hq a multiple of Hkv.
    head_dim: Dk (and Dv of full attention). v_head_dim: NSA's Dv, default Dk.
    mlp_hidden: SwiGLU width, default 8/3 d_model rounded up to 64.
    attention: "nsa" or "full".
    nsa: NSA hyper-parameters (used when attention == "nsa").
    shared_kv: NSA branches share one K/V projection.
    compression: NSA compression function, "mlp" or "mean".
    gate: NSA gate, "linear" (sigmoid of one projection) or "mlp" (sigmoid
      of Linear -> SiLU -> Linear, the paper's wording).
    gate_hidden: hidden width of the "mlp" gate, default d_model // 4.
    tie_embeddings: output projection is the transposed embedding.
    rope_base: RoPE wavelength base.
    impl: NSA implementation, see nsa_jax.ops.
    dtype: compute dtype, "float32" or "bfloat16"; parameters stay float32.
    norm_eps: RMSNorm epsilon.
    remat: per-block rematerialisation, a key of ``REMAT_POLICIES``:
      "none", "block" (the backward recomputes each block from its input:
      memory of one block's activations plus the residual stream) or "dots"
      (keeps the projections' outputs too). Losses and gradients do not
      change.
  """

  vocab_size: int = 256
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 1
  head_dim: int = 64
  v_head_dim: int | None = None
  mlp_hidden: int | None = None
  attention: str = "nsa"
  nsa: NSAConfig = NSAConfig()
  shared_kv: bool = False
  compression: str = "mlp"
  gate: str = "linear"
  gate_hidden: int | None = None
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  impl: str = "auto"
  dtype: str = "float32"
  norm_eps: float = 1e-6
  remat: str = "none"

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LMConfig.{name} must be a positive int, got "
                         f"{value!r}")
    for name in ("v_head_dim", "mlp_hidden", "gate_hidden"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or
                                not isinstance(value, int) or value < 1):
        raise ValueError(f"LMConfig.{name} must be None or a positive int, "
                         f"got {value!r}")
    for name in ("shared_kv", "tie_embeddings"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"LMConfig.{name} must be a bool, got "
                         f"{getattr(self, name)!r}")
    for name in ("rope_base", "norm_eps"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or (
          not value > 0):
        raise ValueError(f"LMConfig.{name} must be a positive number, got "
                         f"{value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LMConfig.num_heads={self.num_heads} must be a "
                       f"multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LMConfig.head_dim={self.head_dim} must be even (RoPE)")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"LMConfig.attention={self.attention!r} is not one of "
                       f"{ATTENTIONS}")
    if (self.attention == "full" and self.v_head_dim not in
        (None, self.head_dim)):
      raise ValueError("LMConfig.v_head_dim must equal head_dim for full "
                       "attention")
    if not isinstance(self.nsa, NSAConfig):
      raise ValueError(f"LMConfig.nsa must be an NSAConfig, got {self.nsa!r}")
    if self.compression not in COMPRESSIONS:
      raise ValueError(f"LMConfig.compression={self.compression!r} is not one "
                       f"of {COMPRESSIONS}")
    if self.gate not in GATES:
      raise ValueError(f"LMConfig.gate={self.gate!r} is not one of {GATES}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"LMConfig.remat={self.remat!r} is not one of "
                       f"{tuple(REMAT_POLICIES)}")
    if self.impl not in IMPLS:
      raise ValueError(f"LMConfig.impl={self.impl!r} is not one of {IMPLS}")
    if self.dtype not in DTYPES:
      raise ValueError(f"LMConfig.dtype={self.dtype!r} is not one of "
                       f"{tuple(DTYPES)}")

  @property
  def hidden(self) -> int:
    """SwiGLU hidden width."""
    if self.mlp_hidden is not None:
      return self.mlp_hidden
    return -(-8 * self.d_model // 3 // 64) * 64


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)): [B, T, d_model] -> [B, T, d_model]."""

  def __init__(self, d_model: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype,
                                     rngs=rngs)
    self.gate, self.up = linear(d_model, hidden), linear(d_model, hidden)
    self.down = linear(hidden, d_model)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    dtype = DTYPES[config.dtype]
    norm = lambda: nnx.RMSNorm(config.d_model, epsilon=config.norm_eps,
                               dtype=dtype, rngs=rngs)
    self.attn_norm, self.mlp_norm = norm(), norm()
    if config.attention == "nsa":
      self.attn = NSAAttention(
          config.d_model, config.num_heads, config.num_kv_heads,
          config.head_dim, v_head_dim=config.v_head_dim, config=config.nsa,
          shared_kv=config.shared_kv, compression=config.compression,
          rope_base=config.rope_base, impl=config.impl, gate=config.gate,
          gate_hidden=config.gate_hidden, dtype=dtype, rngs=rngs)
    else:
      self.attn = FullAttention(
          config.d_model, config.num_heads, config.num_kv_heads,
          config.head_dim, rope_base=config.rope_base, dtype=dtype, rngs=rngs)
    self.mlp = SwiGLU(config.d_model, config.hidden, dtype=dtype, rngs=rngs)

  def __call__(self, x, positions=None, segment_ids=None):
    x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    return x + self.mlp(self.mlp_norm(x))


def _call_block(block: DecoderBlock, x, positions, segment_ids):
  return block(x, positions, segment_ids)


class TransformerLM(nnx.Module):
  """Decoder-only LM: embed, ``num_layers`` DecoderBlocks, RMSNorm, logits.

  Parameters are float32; ``config.dtype="bfloat16"`` runs activations and
  matmuls in bf16 (mixed precision). Logits are float32.

  Token ids must lie in ``[0, vocab_size)``. Concrete ids (an eager call)
  are checked and a bad one raises ``ValueError`` naming it and its
  position. Traced ids (under ``jax.jit``) cannot be checked: an
  out-of-range id, negative ones included, is embedded as a zero vector, so
  its row stays finite and the other positions are computed as usual (the
  logits at and after it do see the zero input). ``nsa_jax.data.
  check_token_ids`` checks ids before a jitted call, e.g. in generation.

  Packed rows: ``segment_ids`` (int [B, T], a document is a run of equal
  ids) keep every attention layer inside each token's document, and RoPE
  positions count from the document's start; the MLPs and norms are per
  token anyway.
  """

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, LMConfig):
      raise TypeError(f"config must be an LMConfig, got {type(config)}")
    self.config = config
    dtype = DTYPES[config.dtype]
    self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype,
                           embedding_init=nnx.initializers.normal(0.02),
                           rngs=rngs)
    self.layers = nnx.List([DecoderBlock(config, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.final_norm = nnx.RMSNorm(config.d_model, epsilon=config.norm_eps,
                                  dtype=dtype, rngs=rngs)
    if not config.tie_embeddings:
      self.lm_head = nnx.Linear(config.d_model, config.vocab_size,
                                use_bias=False, dtype=dtype, rngs=rngs)

  def __call__(self, tokens, positions=None, segment_ids=None):
    """Logits of every position.

    Args:
      tokens: int [B, T].
      positions: optional int [T] or [B, T] RoPE positions (default 0..T-1,
        or the position in each document with ``segment_ids``).
      segment_ids: optional int [B, T]: packed documents.

    Returns:
      float32 logits [B, T, vocab_size].
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be int [B, T], got {tokens.shape} "
                       f"{tokens.dtype}")
    check_segment_ids(segment_ids, tokens)
    try:
      concrete = np.asarray(tokens)
    except jax.errors.TracerArrayConversionError:
      concrete = None  # traced: out-of-range ids embed as zeros
    if concrete is not None:
      check_token_ids(concrete, self.config.vocab_size)
    x = self._embed(tokens)
    policy = REMAT_POLICIES[self.config.remat]
    call = _call_block if self.config.remat == "none" else nnx.remat(
        _call_block, policy=policy)
    for layer in self.layers:
      x = call(layer, x, positions, segment_ids)
    return self.head(x)

  def attention_input(self, tokens, layer: int, positions=None,
                      segment_ids=None):
    """The input of layer ``layer``'s attention: tokens int [B, T] ->
    [B, T, d_model], after the layers below it and that block's attn_norm
    (what ``layers[layer].attn`` sees in ``__call__``)."""
    if not 0 <= layer < len(self.layers):
      raise ValueError(f"layer={layer} is not in [0, {len(self.layers)})")
    x = self._embed(tokens)
    for block in self.layers[:layer]:
      x = block(x, positions, segment_ids)
    return self.layers[layer].attn_norm(x)

  def head(self, x):
    """Final norm and output projection: [B, T, d_model] -> float32 logits."""
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32)

  def init_cache(self, batch: int, max_length: int, *,
                 max_query_len: int = 1):
    """One empty decode cache per layer (a tuple); see nsa_jax.decode."""
    from nsa_jax.decode import layers  # pylint: disable=g-import-not-at-top
    return layers.lm_init_cache(self, batch, max_length,
                                max_query_len=max_query_len)

  def prefill(self, tokens, cache, lengths=None):
    """tokens int [B, T] -> (logits [B, T, vocab], cache); nsa_jax.decode."""
    from nsa_jax.decode import layers  # pylint: disable=g-import-not-at-top
    return layers.lm_prefill(self, tokens, cache, lengths)

  def decode_step(self, tokens, cache):
    """tokens int [B, Q] -> (logits [B, Q, vocab], cache); nsa_jax.decode."""
    from nsa_jax.decode import layers  # pylint: disable=g-import-not-at-top
    return layers.lm_decode_step(self, tokens, cache)

  def _embed(self, tokens):
    """Embeddings [B, T, d_model]; ids outside the vocabulary give zeros.

    Vocabularies up to ``ONE_HOT_VOCAB`` look up by a one-hot matmul: its
    gradient is a matmul too, where a gather's is a scatter-add whose
    atomics collide on frequent tokens. On an H100 (gpu-16k preset, byte
    vocabulary, code text) that scatter took 83.5 ms of a 170 ms training
    step (1.8 ms on uniformly random tokens). The values are the gather's
    exactly (one term per output, float32 accumulation).
    """
    vocab = self.config.vocab_size
    if vocab <= ONE_HOT_VOCAB:
      table = self.embed.embedding[...]
      table = table.astype(self.embed.dtype or table.dtype)
      one_hot = jax.nn.one_hot(tokens, vocab, dtype=table.dtype)  # 0 if bad
      return jnp.einsum("btv,vd->btd", one_hot, table,
                        precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32).astype(
                            table.dtype)
    valid = (tokens >= 0) & (tokens < vocab)
    x = self.embed(jnp.where(valid, tokens, 0))
    return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))


def count_params(config: LMConfig) -> int:
  """Parameters of ``TransformerLM(config)``, counted without allocating.

  NSA's count exceeds full attention's at the same shape: per-branch K/V
  projections (unless ``shared_kv``), the two compression MLPs and the gates.
  """
  model = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in
             jax.tree.leaves(nnx.state(model, nnx.Param)))


def match_mlp_hidden(config: LMConfig, target: int, multiple: int = 64
                     ) -> LMConfig:
  """``config`` with the SwiGLU width whose parameter count is nearest
  ``target`` (a multiple of ``multiple``, at least ``multiple``)."""
  base = dataclasses.replace(config, mlp_hidden=multiple)
  per_step = count_params(
      dataclasses.replace(config, mlp_hidden=2 * multiple)) - count_params(
          base)
  steps = max(round((target - count_params(base)) / per_step), 0)
  return dataclasses.replace(config, mlp_hidden=multiple * (steps + 1))
