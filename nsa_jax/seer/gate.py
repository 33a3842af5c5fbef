"""AttnGate (SeerAttention-R): which key blocks each GQA group will attend to.

The gate reads the model's own queries and keys before RoPE. Query side: the
g query heads of a kv head are merged into one d_gate vector (a linear map
of all g heads, or their mean then a linear map), optionally RMS-normalised,
then rotated by RoPE at the token's position. Key side: the keys are cut
into non-overlapping blocks of b; each block is pooled to ``[max, min,
mean]`` (3D numbers, in that order), mapped to d_gate by a per-kv-head
linear map, optionally RMS-normalised and rotated by RoPE at the block's
first position. The gate's distribution for query t is
``softmax_j(q_gate . k_gate[j] / sqrt(d_gate))`` over the blocks ``j <
t // b``: the complete blocks before the query's own block, which decoding
always reads anyway.
"""

from __future__ import annotations

from flax import nnx
import jax.numpy as jnp

from nsa_jax.modules.rope import apply_rope
from nsa_jax.modules.transformer import LMConfig
from nsa_jax.seer.config import SeerConfig
from nsa_jax.xla import masked_softmax


def pool_blocks(k, block_size: int):
  """Max, min and mean of each complete block of keys.

  Args:
    k: [B, T, Hkv, D].
    block_size: b.

  Returns:
    float32 [B, T // b, Hkv, 3D]: ``[max, min, mean]`` over the block's b
    keys, concatenated in that order; an incomplete last block is left out.
  """
  b, t, h, d = k.shape
  n = t // block_size
  blocks = k[:, :n * block_size].astype(jnp.float32).reshape(
      b, n, block_size, h, d)
  return jnp.concatenate([blocks.max(axis=2), blocks.min(axis=2),
                          blocks.mean(axis=2)], axis=-1)


def visible_blocks(positions, num_blocks: int, block_size: int):
  """bool [B, Q, 1, N]: block j is scored for query t iff ``j < t // b``.

  Args:
    positions: int [B, Q] query positions.
    num_blocks: N.
    block_size: b.
  """
  own = (positions // block_size)[:, :, None, None]
  return jnp.arange(num_blocks) < own


def block_logits(q_gate, k_gate, positions, block_size: int):
  """The gate's scaled scores and which of them a query may use.

  Args:
    q_gate: [B, Q, Hkv, d_gate] gate queries.
    k_gate: [B, N, Hkv, d_gate] gate keys of blocks 0 .. N-1.
    positions: int [B, Q] positions of the queries.
    block_size: b.

  Returns:
    (logits float32 [B, Q, Hkv, N], mask bool [B, Q, 1, N]: j < t // b).
  """
  logits = jnp.einsum("bqhe,bnhe->bqhn", q_gate.astype(jnp.float32),
                      k_gate.astype(jnp.float32)) * q_gate.shape[-1] ** -0.5
  return logits, visible_blocks(positions, k_gate.shape[1], block_size)


def block_log_probs(logits, mask):
  """Log-softmax over the visible blocks; -inf elsewhere.

  Args:
    logits: float32 [..., N]. mask: bool broadcastable to it.

  Returns:
    float32 [..., N]; a row with no visible block is all -inf (its
    probabilities, ``exp``, are all 0), with zero gradients.
  """
  _, lse = masked_softmax(logits, mask)
  return jnp.where(mask, logits - lse[..., None], -jnp.inf)


class AttnGate(nnx.Module):
  """SeerAttention-R's attention gate for one layer (see the module doc).

  Parameters: ``q_weight`` [Hkv, G, D, d_gate] ("linear") or [Hkv, D,
  d_gate] ("mean"), ``k_weight`` [Hkv, 3D, d_gate], no biases; RMSNorm
  scales with ``qk_norm``. Computes in float32 whatever the input dtype.
  """

  def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
               config: SeerConfig, *, rope_base: float = 10000.0,
               rngs: nnx.Rngs):
    """Args:
      num_heads: Hq. num_kv_heads: Hkv, dividing Hq. head_dim: D.
      config: the gate's settings.
      rope_base: RoPE wavelength base (the model's).
      rngs: parameter initialisation.
    """
    if not isinstance(config, SeerConfig):
      raise TypeError(f"config must be a SeerConfig, got {type(config)}")
    for name, value in (("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of "
                       f"num_kv_heads={num_kv_heads}")
    self.config, self.rope_base = config, rope_base
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    self.head_dim = head_dim
    group, dg = num_heads // num_kv_heads, config.gate_dim
    if config.query_merge == "linear":  # fan-in: the group's G * D numbers
      init = nnx.initializers.lecun_normal(in_axis=(1, 2), out_axis=-1,
                                           batch_axis=(0,))
      shape = (num_kv_heads, group, head_dim, dg)
    else:
      init = nnx.initializers.lecun_normal(batch_axis=(0,))
      shape = (num_kv_heads, head_dim, dg)
    self.q_weight = nnx.Param(init(rngs.params(), shape, jnp.float32))
    self.k_weight = nnx.Param(
        nnx.initializers.lecun_normal(batch_axis=(0,))(
            rngs.params(), (num_kv_heads, 3 * head_dim, dg), jnp.float32))
    norm = lambda: (nnx.RMSNorm(dg, dtype=jnp.float32, rngs=rngs)
                    if config.qk_norm else None)
    self.q_norm, self.k_norm = norm(), norm()

  def _finish(self, x, norm, positions):
    if norm is not None:
      x = norm(x)
    if self.config.rope:
      x = apply_rope(x, positions, self.rope_base)
    return x

  def queries(self, q, positions):
    """Gate queries of the model's queries.

    Args:
      q: [B, T, Hq, D] queries before RoPE.
      positions: int [T] or [B, T], their positions.

    Returns:
      float32 [B, T, Hkv, d_gate].
    """
    b, t, hq, d = q.shape
    if (hq, d) != (self.num_heads, self.head_dim):
      raise ValueError(f"q has {hq} heads of {d}, the gate was made for "
                       f"{self.num_heads} of {self.head_dim}")
    grouped = q.astype(jnp.float32).reshape(b, t, self.num_kv_heads, -1, d)
    if self.config.query_merge == "linear":
      x = jnp.einsum("bthgd,hgde->bthe", grouped, self.q_weight[...])
    else:
      x = jnp.einsum("bthd,hde->bthe", grouped.mean(axis=3),
                     self.q_weight[...])
    return self._finish(x, self.q_norm, positions)

  def keys(self, k, start=0):
    """Gate keys of each complete block of the model's keys.

    Args:
      k: [B, T, Hkv, D] keys before RoPE, position ``start`` first.
      start: int, or int [B], the position of ``k[:, 0]`` (a multiple of
        b, so blocks stay aligned).

    Returns:
      float32 [B, T // b, Hkv, d_gate]; block j is rotated by RoPE at
      position ``start + j * b``.
    """
    b, t, hkv, d = k.shape
    if (hkv, d) != (self.num_kv_heads, self.head_dim):
      raise ValueError(f"k has {hkv} heads of {d}, the gate was made for "
                       f"{self.num_kv_heads} of {self.head_dim}")
    size = self.config.block_size
    x = jnp.einsum("bnhc,hce->bnhe", pool_blocks(k, size),
                   self.k_weight[...])
    first = jnp.reshape(jnp.asarray(start, jnp.int32), (-1, 1))  # [B or 1, 1]
    positions = jnp.broadcast_to(first + size * jnp.arange(t // size),
                                 (b, t // size))
    return self._finish(x, self.k_norm, positions)

  def __call__(self, q, k):
    """The gate's log-probabilities of every query of a sequence.

    Args:
      q: [B, T, Hq, D] and k: [B, T, Hkv, D], before RoPE, positions
        0 .. T-1.

    Returns:
      float32 [B, T, Hkv, T // b]: log-softmax over the blocks ``j < t //
      b`` of query t; -inf for the others.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2]:
      raise ValueError(f"expected q [B, T, Hq, D] and k [B, T, Hkv, D] of "
                       f"one sequence, got {q.shape=}, {k.shape=}")
    positions = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    logits, mask = block_logits(self.queries(q, positions), self.keys(k),
                                positions, self.config.block_size)
    return block_log_probs(logits, mask)


class SeerGates(nnx.Module):
  """One AttnGate per layer of a full-attention ``TransformerLM``."""

  def __init__(self, lm_config: LMConfig, config: SeerConfig, *,
               rngs: nnx.Rngs):
    """Args:
      lm_config: the model's config (``attention="full"``).
      config: the gates' settings.
      rngs: parameter initialisation.
    """
    if not isinstance(lm_config, LMConfig):
      raise TypeError(f"lm_config must be an LMConfig, got {type(lm_config)}")
    if lm_config.attention != "full":
      raise ValueError(f"SeerAttention-R gates go on a full-attention model, "
                       f"got LMConfig.attention={lm_config.attention!r}")
    self.config = config
    self.layers = nnx.List([
        AttnGate(lm_config.num_heads, lm_config.num_kv_heads,
                 lm_config.head_dim, config, rope_base=lm_config.rope_base,
                 rngs=rngs) for _ in range(lm_config.num_layers)])
