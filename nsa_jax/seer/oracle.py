"""The gates' training target: which blocks full attention actually reads.

For query t of kv head g and key block j (keys ``[j*b, (j+1)*b)``), the
raw score is the largest causal softmax probability that any query head of
the group puts on any key of the block,
``max_{h in group g, s in block j} softmax_s(scale q[t,h].k[s])``.
Blocks ``j >= t // b`` (the query's own block, which decoding always reads,
and later ones) score 0. The target distribution of query t divides its
scores by their sum (all 0 when ``t < b``: no block is scored).

``attention_oracle`` computes it with the model's attention output in one
call, never holding a ``T x T`` matrix except on the reference path:
  "pallas"     ``pallas_kernels.attention_block_max`` (two passes over the
               keys per query tile; interpret mode without a GPU)
  "xla"        chunks of queries, each against all keys
  "reference"  dense ``T x T`` probabilities (small shapes only)
  "auto"       "pallas" on a GPU where the kernel serves, else "xla"
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nsa_jax import chunking
from nsa_jax import registry
from nsa_jax import validation
from nsa_jax.impls import pallas as pallas_impl
from nsa_jax.reference import masked_attention
from nsa_jax.xla import accum_dtype
from nsa_jax.xla import masked_softmax


def _scale(q, scale):
  return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _block_max(p, positions, num_kv_heads: int, block_size: int):
  """Raw oracle scores from causal probabilities.

  Args:
    p: float32 [B, C, Hq, S] probabilities (0 where masked), S any length.
    positions: int [C] positions of the C queries.
    num_kv_heads: Hkv.
    block_size: b.

  Returns:
    float32 [B, C, Hkv, ceil(S / b)], 0 for blocks j >= t // b.
  """
  b, c, hq, s = p.shape
  n = -(-s // block_size)
  p = jnp.pad(p, [(0, 0)] * 3 + [(0, n * block_size - s)])
  p = p.reshape(b, c, num_kv_heads, hq // num_kv_heads, n, block_size)
  raw = p.max(axis=(3, 5))  # over the group's heads and the block's keys
  keep = jnp.arange(n)[None, :] < (positions // block_size)[:, None]
  return jnp.where(keep[None, :, None, :], raw, 0.0)


def normalize(raw):
  """Each query's scores divided by their sum; all 0 where they sum to 0.

  Args:
    raw: float32 [..., N] non-negative.

  Returns:
    float32 [..., N].
  """
  total = jnp.sum(raw, axis=-1, keepdims=True)
  return jnp.where(total > 0, raw / jnp.where(total > 0, total, 1.0), 0.0)


def attention_oracle_reference(q, k, v, *, block_size: int, scale=None):
  """Dense, float32: causal attention and the raw oracle scores.

  Args:
    q: [B, T, Hq, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv].
    block_size: b. scale: default 1/sqrt(Dk).

  Returns:
    (out [B, T, Hq, Dv] in q.dtype, raw float32 [B, T, Hkv, ceil(T/b)]).
  """
  t = q.shape[1]
  hkv = k.shape[2]
  scale = _scale(q, scale)
  pos = jnp.arange(t)
  causal = (pos[None, :] <= pos[:, None])[None, :, None, :]  # [1, T, 1, S]
  out, lse = masked_attention(q, k, v, causal, scale)
  acc = jnp.promote_types(q.dtype, jnp.float32)
  kk = jnp.repeat(k.astype(acc), q.shape[2] // hkv, axis=2)
  s = jnp.einsum("bthd,bshd->bths", q.astype(acc), kk) * scale
  p = jnp.where(causal, jnp.exp(s - lse[..., None]), 0.0)
  return out, _block_max(p.astype(jnp.float32), pos, hkv, block_size)


def attention_oracle_xla(q, k, v, *, block_size: int, scale=None,
                         chunk_size: int = 128):
  """Chunked over queries: a chunk of C queries holds [C, T] scores.

  Args and Returns: as ``attention_oracle_reference``.
  """
  b, t, hq, dk = q.shape
  hkv = k.shape[2]
  scale = _scale(q, scale)
  acc = accum_dtype(q)
  keys = jnp.arange(t)

  def body(q_chunk, t0):
    c = q_chunk.shape[1]
    qg = q_chunk.reshape(b, c, hkv, hq // hkv, dk)
    s = jnp.einsum("bcgrd,bsgd->bcgrs", qg, k,
                   preferred_element_type=acc) * scale
    positions = t0 + jnp.arange(c)
    mask = (keys[None, :] <= positions[:, None])[None, :, None, None, :]
    p, _ = masked_softmax(s, mask)  # [B, C, Hkv, G, T]
    out = jnp.einsum("bcgrs,bsgd->bcgrd", p.astype(v.dtype), v,
                     preferred_element_type=acc)
    raw = _block_max(p.reshape(b, c, hq, t).astype(jnp.float32), positions,
                     hkv, block_size)
    return out.reshape(b, c, hq, -1).astype(q.dtype), raw

  return chunking.map_query_chunks(body, (q,), chunk_size)


def _pallas(q, k, v, *, block_size: int, scale=None):
  import pallas_kernels  # pylint: disable=g-import-not-at-top
  return pallas_kernels.attention_block_max(q, k, v, block_size=block_size,
                                            scale=scale)


def supports_pallas(q, k, v, *, block_size: int, **static):
  """None if the kernel serves these inputs, else why not."""
  del static
  if block_size < pallas_impl.MIN_BLOCK or block_size & (block_size - 1):
    return (f"the kernel needs a power-of-two block_size >= "
            f"{pallas_impl.MIN_BLOCK}, got {block_size}")
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) > 1 or dtypes.pop() not in {
      jnp.dtype(d) for d in pallas_impl.DTYPES}:
    return (f"the kernel takes one of float16, bfloat16, float32 for q, k "
            f"and v, got {q.dtype}, {k.dtype}, {v.dtype}")
  return None


ORACLE = registry.Registry("attention_oracle")
ORACLE.register("pallas", _pallas, supports_pallas, auto_backends=("gpu",))
ORACLE.register("xla", attention_oracle_xla,
                auto_backends=("cpu", "gpu", "tpu"))
ORACLE.register("reference", attention_oracle_reference)


@functools.partial(jax.jit, static_argnames=("fn", "block_size", "scale"))
def _run(q, k, v, *, fn, block_size, scale):
  q, k, v = jax.tree.map(jax.lax.stop_gradient, (q, k, v))
  out, raw = fn(q, k, v, block_size=block_size, scale=scale)
  return out, normalize(raw)


def attention_oracle(q, k, v, *, block_size: int, scale: float | None = None,
                     impl: str = "auto"):
  """Causal attention and SeerAttention-R's block target (module doc).

  Not differentiable: the inputs are wrapped in ``stop_gradient``.

  Args:
    q: [B, T, Hq, Dk] queries after RoPE, Hq a multiple of Hkv.
    k: [B, T, Hkv, Dk] keys after RoPE; v: [B, T, Hkv, Dv].
    block_size: b, keys per block.
    scale: softmax scale, default 1/sqrt(Dk).
    impl: "auto", "pallas", "xla" or "reference".

  Returns:
    (out [B, T, Hq, Dv] in q.dtype, target float32 [B, T, Hkv,
    ceil(T / b)]: each query's distribution over the blocks before its own,
    all 0 for ``t < b``).

  Raises:
    ValueError, TypeError: inputs that do not fit, a block size < 1, or an
      impl that cannot serve the call (with the reason).
  """
  validation.check_attention(q, k, v)
  if isinstance(block_size, bool) or not isinstance(block_size, int) or (
      block_size < 1):
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  entry = ORACLE.resolve(impl, q, k, v, block_size=block_size, scale=scale)
  return _run(q, k, v, fn=entry.fn, block_size=block_size,
              scale=None if scale is None else float(scale))
