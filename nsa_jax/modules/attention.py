"""Attention layers: NSAAttention (three gated branches), FullAttention."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from nsa_jax import ops
from nsa_jax import segments
from nsa_jax import validation
from nsa_jax.config import NSAConfig
from nsa_jax.modules import dense_attention
from nsa_jax.modules.compression import BlockCompressor
from nsa_jax.modules.rope import apply_rope
from nsa_jax.parallel import attention as parallel_attention

BRANCHES = ("cmp", "slc", "win")
GATES = ("linear", "mlp")


def _check_heads(num_heads, num_kv_heads):
  if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} must be a positive multiple of "
                     f"num_kv_heads={num_kv_heads}")


def _check_head_dim(head_dim):
  if head_dim < 2 or head_dim % 2:
    raise ValueError(f"head_dim={head_dim} must be even and >= 2 (RoPE)")


def _check_d_model(d_model):
  if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
    raise ValueError(f"d_model={d_model!r} must be a positive int")


def _check_x(x):
  """x must be a real floating [B, T, d_model] array."""
  if jnp.ndim(x) != 3:
    raise ValueError(f"x must be [B, T, d_model], got shape {jnp.shape(x)}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f"x must be a real floating-point array (embed token "
                    f"ids first), got dtype {jnp.result_type(x)}")


def _check_gate(gate, gate_hidden):
  if gate not in GATES:
    raise ValueError(f"gate={gate!r} is not one of {GATES}")
  if gate_hidden is not None and (isinstance(gate_hidden, bool) or
                                  not isinstance(gate_hidden, int) or
                                  gate_hidden < 1):
    raise ValueError(f"gate_hidden must be None or a positive int, got "
                     f"{gate_hidden!r}")


def _positions(x, positions, segment_ids=None):
  """RoPE positions: as given, else 0.. within each document (or T)."""
  if positions is not None:
    return positions
  if segment_ids is not None:
    return segments.document_positions(segment_ids)
  return jnp.arange(x.shape[1])


class NSAAttention(nnx.Module):
  """Native Sparse Attention layer (arXiv 2502.11089, section 3).

  x [B, T, d_model] -> q [B, T, Hq, Dk]; keys/values per branch
  [B, T, Hkv, Dk/Dv] (independent per branch by default, one shared set with
  ``shared_kv=True``); RoPE on queries and raw keys; the compression branch
  squeezes its keys/values into [B, Tc, Hkv, D] with ``BlockCompressor``
  (its keys after RoPE, so an MLP compressor sees absolute positions and the
  layer is not exactly shift-invariant; "mean" compression is);
  gates [B, T, Hq, 3] = sigmoid(Linear(x)) (``gate="linear"``) or, as the
  paper derives them "via an MLP and sigmoid", sigmoid(Linear(SiLU(Linear(
  x)))) (``gate="mlp"``); ``nsa_jax.ops.nsa_attention``
  mixes the branches; the output projection maps [B, T, Hq * Dv] back to
  [B, T, d_model].

  Packed sequences: ``segment_ids`` [B, T] restrict every branch to the
  query's document (docs/SEMANTICS.md), and RoPE positions then count from
  each document's start unless ``positions`` are given. A document that
  starts on a selection-block edge (a multiple of l', hence of d) then gives
  the outputs it gives alone.
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, v_head_dim: int | None = None,
               config: NSAConfig = NSAConfig(), shared_kv: bool = False,
               compression: str = "mlp", compression_hidden: int | None = None,
               rope_base: float = 10000.0, impl: str = "auto",
               gate: str = "linear", gate_hidden: int | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    """Args:
      d_model: model width.
      num_heads: Hq. num_kv_heads: Hkv, dividing Hq (GQA group G = Hq / Hkv).
      head_dim: Dk. v_head_dim: Dv, default Dk.
      config: NSA hyper-parameters.
      shared_kv: one key/value projection for all three branches.
      compression: "mlp" or "mean" (see BlockCompressor).
      compression_hidden: width of the compression MLP.
      rope_base: RoPE wavelength base.
      impl: "auto", "pallas", "xla" or "reference" (see nsa_jax.ops); an
        impl that cannot run this config (e.g. "pallas" with an l' the
        kernel lacks) is refused here, not at the first call.
      gate: "linear" (one projection) or "mlp" (Linear -> SiLU -> Linear);
        both end in a sigmoid and start at 0.5 (zero-initialised last layer).
      gate_hidden: hidden width of the "mlp" gate, default d_model // 4.
      dtype: compute dtype; param_dtype: parameter dtype.
      rngs: parameter initialisation.
    """
    _check_d_model(d_model)
    _check_heads(num_heads, num_kv_heads)
    _check_head_dim(head_dim)
    if v_head_dim is not None and v_head_dim < 1:
      raise ValueError(f"v_head_dim must be >= 1 (or None for head_dim), got "
                       f"{v_head_dim}")
    if not isinstance(config, NSAConfig):
      raise TypeError(f"config must be an NSAConfig, got {type(config)}")
    _check_gate(gate, gate_hidden)
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    ops.check_nsa_support(config, impl, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, head_dim=head_dim,
                          v_head_dim=v_head_dim,
                          dtype=jnp.float32 if dtype is None else dtype)
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    self.head_dim, self.v_head_dim = head_dim, v_head_dim
    self.config, self.shared_kv, self.impl = config, shared_kv, impl
    self.rope_base = rope_base
    linear = lambda i, o, **kw: nnx.Linear(
        i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw)
    self.q_proj = linear(d_model, num_heads * head_dim, use_bias=False)
    kv_sets = ("shared",) if shared_kv else BRANCHES
    self.k_proj = nnx.Dict({name: linear(d_model, num_kv_heads * head_dim,
                                         use_bias=False) for name in kv_sets})
    self.v_proj = nnx.Dict({name: linear(d_model, num_kv_heads * v_head_dim,
                                         use_bias=False) for name in kv_sets})
    compressor = lambda dim: BlockCompressor(
        dim, block_size=config.cmp_block, stride=config.cmp_stride,
        kind=compression, hidden=compression_hidden, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)
    self.compress_k = compressor(head_dim)
    self.compress_v = compressor(v_head_dim)
    self.gate = gate
    if gate == "mlp":
      self.gate_hidden_proj = linear(d_model,
                                     gate_hidden or max(d_model // 4, 1))
    self.gate_proj = linear(
        d_model if gate == "linear" else self.gate_hidden_proj.out_features,
        num_heads * len(BRANCHES), kernel_init=nnx.initializers.zeros_init())
    self.out_proj = linear(num_heads * v_head_dim, d_model, use_bias=False)

  def _kv(self, x, branch, positions):
    name = "shared" if self.shared_kv else branch
    b, t, _ = x.shape
    k = self.k_proj[name](x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj[name](x).reshape(b, t, self.num_kv_heads, self.v_head_dim)
    return apply_rope(k, positions, self.rope_base), v

  def branch_inputs(self, x, positions=None, segment_ids=None):
    """Projections that feed ``nsa_jax.ops.nsa_attention``.

    Args:
      x: [B, T, d_model].
      positions: int [T] or [B, T], default 0 .. T-1, or the position in
        each document with ``segment_ids``.
      segment_ids: optional int [B, T] (only sets the default positions).

    Returns:
      dict with q [B,T,Hq,Dk], k/v [B,T,Hkv,Dk/Dv] (selection), k_win/v_win
      (window), k_cmp/v_cmp [B,Tc,Hkv,Dk/Dv] and gates [B,T,Hq,3] in (0,1).
    """
    _check_x(x)
    b, t, _ = x.shape
    positions = _positions(x, positions, segment_ids)
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    q = apply_rope(q, positions, self.rope_base)
    k_cmp_raw, v_cmp_raw = self._kv(x, "cmp", positions)
    k, v = self._kv(x, "slc", positions)
    k_win, v_win = self._kv(x, "win", positions)
    hidden = x if self.gate == "linear" else jax.nn.silu(
        self.gate_hidden_proj(x))
    gates = jax.nn.sigmoid(
        self.gate_proj(hidden).reshape(b, t, self.num_heads, len(BRANCHES)))
    return dict(q=q, k=k, v=v, k_win=k_win, v_win=v_win,
                k_cmp=self.compress_k(k_cmp_raw),
                v_cmp=self.compress_v(v_cmp_raw), gates=gates)

  def __call__(self, x, positions=None, segment_ids=None):
    """x [B, T, d_model] -> [B, T, d_model].

    Args:
      x: [B, T, d_model].
      positions: int [T] or [B, T] RoPE positions (see ``branch_inputs``).
      segment_ids: optional int [B, T]: packed documents.
    """
    _check_x(x)
    validation.check_segment_ids(segment_ids, x)
    inputs = self.branch_inputs(x, positions, segment_ids)
    # ops.nsa_attention, or its sharded form on an active mesh.
    out = parallel_attention.nsa_attention(
        inputs["q"], inputs["k"], inputs["v"], inputs["gates"], self.config,
        k_cmp=inputs["k_cmp"], v_cmp=inputs["v_cmp"], k_win=inputs["k_win"],
        v_win=inputs["v_win"], segment_ids=segment_ids, impl=self.impl)
    b, t = x.shape[:2]
    return self.out_proj(out.reshape(b, t, self.num_heads * self.v_head_dim))

  def init_cache(self, batch: int, max_length: int, *,
                 max_query_len: int = 1, dtype=None):
    """An empty ``nsa_jax.decode.NSACache`` of ``max_length`` tokens a row."""
    from nsa_jax.decode import layers  # pylint: disable=g-import-not-at-top
    return layers.nsa_init_cache(self, batch, max_length,
                                 max_query_len=max_query_len, dtype=dtype)

  def prefill(self, x, cache, lengths=None):
    """x [B, T, d_model] -> ([B, T, d_model], cache); see nsa_jax.decode."""
    from nsa_jax.decode import layers  # pylint: disable=g-import-not-at-top
    return layers.nsa_prefill(self, x, cache, lengths)

  def decode_step(self, x, cache):
    """x [B, Q, d_model] -> ([B, Q, d_model], cache); see nsa_jax.decode."""
    from nsa_jax.decode import layers  # pylint: disable=g-import-not-at-top
    return layers.nsa_decode_step(self, x, cache)


class FullAttention(nnx.Module):
  """Dense causal GQA attention with RoPE (``dense_attention``).

  What runs where, with ``implementation="auto"``: on an NVIDIA GPU with a
  bf16/fp16 compute dtype and a head dim cuDNN takes (multiple of 8, <= 256
  on Hopper, <= 128 before), cuDNN's flash attention, any T (padded to a
  multiple of 64 inside); elsewhere (CPU, float32, other head dims) XLA's
  attention, which materialises ``T x T`` scores. Same projections and
  shapes as NSAAttention with one K/V set. With ``segment_ids`` a query
  attends within its document (RoPE positions count from its start), on a
  GPU through jax's Pallas flash attention (cuDNN in jax takes no segment
  ids).
  """

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int,
               head_dim: int, *, rope_base: float = 10000.0,
               implementation: str = "auto", dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    """Args:
      d_model: model width.
      num_heads: Hq. num_kv_heads: Hkv, dividing Hq.
      head_dim: Dk = Dv.
      rope_base: RoPE wavelength base.
      implementation: "auto", "cudnn" (raises at call time where cuDNN does
        not serve), "pallas" or "xla"; see
        ``dense_attention.causal_attention``.
      dtype: compute dtype; param_dtype: parameter dtype.
      rngs: parameter initialisation.
    """
    _check_d_model(d_model)
    _check_heads(num_heads, num_kv_heads)
    _check_head_dim(head_dim)
    if implementation not in dense_attention.IMPLEMENTATIONS:
      raise ValueError(f"implementation={implementation!r} is not one of "
                       f"{dense_attention.IMPLEMENTATIONS}")
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    self.head_dim, self.rope_base = head_dim, rope_base
    self.implementation = implementation
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(d_model, num_heads * head_dim)
    self.k_proj = linear(d_model, num_kv_heads * head_dim)
    self.v_proj = linear(d_model, num_kv_heads * head_dim)
    self.out_proj = linear(num_heads * head_dim, d_model)

  def __call__(self, x, positions=None, segment_ids=None):
    """x [B, T, d_model] -> [B, T, d_model].

    Args:
      x: [B, T, d_model].
      positions: int [T] or [B, T] RoPE positions; default 0 .. T-1, or the
        position in each document with ``segment_ids``.
      segment_ids: optional int [B, T]: packed documents.
    """
    _check_x(x)
    validation.check_segment_ids(segment_ids, x)
    b, t, _ = x.shape
    positions = _positions(x, positions, segment_ids)
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q = apply_rope(q, positions, self.rope_base)
    k = apply_rope(k, positions, self.rope_base)
    out = dense_attention.causal_attention(
        q, k, v, segment_ids=segment_ids, implementation=self.implementation)
    return self.out_proj(out.reshape(b, t, self.num_heads * self.head_dim))

  def init_cache(self, batch: int, max_length: int, *,
                 max_query_len: int = 1, dtype=None):
    """An empty ``nsa_jax.decode.FullCache`` of ``max_length`` tokens a row."""
    from nsa_jax.decode import layers  # pylint: disable=g-import-not-at-top
    del max_query_len  # any number of tokens per step fits a dense cache
    return layers.full_init_cache(self, batch, max_length, dtype=dtype)

  def prefill(self, x, cache, lengths=None):
    """x [B, T, d_model] -> ([B, T, d_model], cache); see nsa_jax.decode."""
    from nsa_jax.decode import layers  # pylint: disable=g-import-not-at-top
    return layers.full_prefill(self, x, cache, lengths)

  def decode_step(self, x, cache):
    """x [B, Q, d_model] -> ([B, Q, d_model], cache); see nsa_jax.decode."""
    from nsa_jax.decode import layers  # pylint: disable=g-import-not-at-top
    return layers.full_decode_step(self, x, cache)
