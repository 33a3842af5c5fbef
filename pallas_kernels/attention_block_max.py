"""Causal attention and its per-block maximum probabilities (Pallas Triton).

The oracle that SeerAttention-R (arXiv 2506.08889, section 3.2) distils its
gates from: for every query, the largest softmax probability that the full
causal attention puts on any key of each block, max-pooled over the query
heads of a GQA group. A program makes two passes over the keys and never
holds more than one ``[rows, block_size]`` tile of scores: the first is the
FlashAttention-2 forward (output, row maximum and row sum), the second
recomputes each block's probabilities from those statistics and keeps their
maximum.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import group_tiles
from pallas_kernels import online_softmax
from pallas_kernels import triton_compat as tc

# Query rows (positions x padded group) per program.
_ROWS = 64


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable settings of one call."""

  block_size: int  # b: keys per gate block, also the key tile of pass 1
  scale: float
  seq_len: int  # T
  group: int  # G
  block_q: int  # query positions per program
  num_warps: int
  num_stages: int
  interpret: bool


def _kernel(q_ref, k_ref, v_ref, o_ref, max_ref, *, st: _Static):
  """Attention output and block maxima of one (batch, query tile, kv head).

  Pass 1 runs the online softmax (``online_softmax``) over the key tiles up
  to the tile's last query. Pass 2 walks the blocks ``j`` before the last
  query's own block, recomputes ``p = softmax(scale q.k)`` of the block
  from the residuals of pass 1, takes the maximum over its keys and over
  the real heads of the group, and stores one column of ``max``. A row's
  entry for block ``j`` is written only for ``j < t // b`` (its own block
  and later ones are left for the caller to mask).

  Refs: q [block_q, Gp, Dk], k [Tp, Dk], v [Tp, Dv] -> o [block_q, Gp, Dv],
  max [block_q, Nb_p] float32.
  """
  block_q, group_p, _ = q_ref.shape
  b = st.block_size
  q, t = group_tiles.query_tile(q_ref)  # [rows, Dk], [rows]
  rows = q.shape[0]
  c = st.scale * tc.LOG2E
  keys = jnp.arange(b)
  t_last = jnp.minimum(pl.program_id(1) * block_q + block_q, st.seq_len) - 1

  def attend(j, carry):
    start = pl.multiple_of(j * b, b)
    k = k_ref[pl.ds(start, b), :]  # [b, Dk]
    s = tc.dot(q, k, trans_b=True)  # [rows, b] raw dots
    v = v_ref[pl.ds(start, b), :]  # [b, Dv]
    visible = (start + keys)[None, :] <= t[:, None]
    return online_softmax.step(carry, s, visible, v, None, c)

  carry = lax.fori_loop(0, lax.div(t_last, b) + 1, attend,
                        online_softmax.init(rows, v_ref.shape[-1]))
  out, m, log2l, _ = online_softmax.finalize(carry, st.scale)
  o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)

  own = lax.div(t, b)  # [rows]: each row's own block, excluded
  real_head = lax.rem(jnp.arange(rows), group_p) < st.group

  def block_max(j, _):
    start = pl.multiple_of(j * b, b)
    k = k_ref[pl.ds(start, b), :]
    s = tc.dot(q, k, trans_b=True)  # the same dots as pass 1
    keep = ((j < own) & real_head)[:, None]  # whole block causal
    p = online_softmax.probabilities(s, keep, m, log2l, c)  # [rows, b]
    per_row = jnp.max(p, axis=1)  # [rows]
    per_position = jnp.max(per_row.reshape(block_q, group_p), axis=1)
    max_ref[:, pl.ds(j, 1)] = per_position[:, None]
    return _

  lax.fori_loop(0, lax.div(t_last, b), block_max, 0)


@functools.partial(jax.jit, static_argnames=("st",))
def _attention_block_max(q, k, v, st: _Static):
  hkv = k.shape[2]
  b = st.block_size
  seq_pad = tc.round_up(st.seq_len, max(st.block_q, b))
  group_p = tc.next_pow2(st.group)
  dk_p = tc.next_pow2(q.shape[-1], tc.MIN_DOT_DIM)
  dv_p = tc.next_pow2(v.shape[-1], tc.MIN_DOT_DIM)
  num_blocks = -(-st.seq_len // b)
  blocks_p = tc.next_pow2(num_blocks)
  q5 = tc.group_heads(q, hkv, seq_pad, group_p, dk_p)
  k_p = tc.pad_axis(tc.pad_axis(k, 1, seq_pad), 3, dk_p)
  v_p = tc.pad_axis(tc.pad_axis(v, 1, seq_pad), 3, dv_p)
  batch = q.shape[0]
  out, block_max = pl.pallas_call(
      functools.partial(_kernel, st=st),
      grid=(batch, seq_pad // st.block_q, hkv),
      in_specs=[group_tiles.group_spec(st.block_q, group_p, dk_p),
                group_tiles.kv_spec(seq_pad, dk_p),
                group_tiles.kv_spec(seq_pad, dv_p)],
      out_specs=[group_tiles.group_spec(st.block_q, group_p, dv_p),
                 group_tiles.group_spec(st.block_q, blocks_p)],
      out_shape=[
          jax.ShapeDtypeStruct((batch, seq_pad, hkv, group_p, dv_p), q.dtype),
          jax.ShapeDtypeStruct((batch, seq_pad, hkv, blocks_p), jnp.float32)],
      compiler_params=tc.compiler_params(st.num_warps, st.num_stages),
      interpret=st.interpret,
      name="seer_attention_block_max",
  )(q5, k_p, v_p)
  out = tc.ungroup_heads(out, st.seq_len, st.group, v.shape[-1])
  block_max = block_max[:, :st.seq_len, :, :num_blocks]
  written = (jnp.arange(num_blocks)[None, :]
             < (jnp.arange(st.seq_len) // b)[:, None])  # [T, Nb]
  return out, jnp.where(written[None, :, None, :], block_max, 0.0)


def default_block_q(group: int, seq_len: int) -> int:
  """Query positions per program: about 64 rows, at least 16."""
  group_p = tc.next_pow2(group)
  return max(max(1, tc.MIN_DOT_DIM // group_p),
             min(max(1, _ROWS // group_p), tc.next_pow2(seq_len)))


def attention_block_max(q, k, v, *, block_size: int,
                        scale: float | None = None,
                        block_q: int | None = None,
                        interpret: bool | None = None, num_warps: int = 4,
                        num_stages: int = 2):
  """Causal GQA attention and, per query and key block, its largest probability.

  Not differentiable (an oracle): inputs are wrapped in ``stop_gradient``.
  Inputs are those of a trained model: finite (no masking of non-finite
  keys is done).

  Args:
    q: [B, T, Hq, Dk] queries (after RoPE), Hq = G * Hkv.
    k: [B, T, Hkv, Dk] keys (after RoPE); v: [B, T, Hkv, Dv].
    block_size: b, keys per block; a power of two >= 16.
    scale: softmax scale, default 1/sqrt(Dk).
    block_q: query positions per program (a power of two); None:
      ``default_block_q``.
    interpret: Pallas interpret mode; None: when no GPU is present.
    num_warps, num_stages: Triton launch settings.

  Returns:
    (out [B, T, Hq, Dv] in q.dtype: causal softmax attention;
    block_max float32 [B, T, Hkv, ceil(T / b)]: for query t and block j <
    t // b, ``max_{h in group, s in block j} softmax_s(scale q[t,h].k[s])``;
    0 for j >= t // b, the query's own block and later ones).

  Raises:
    ValueError: shapes or settings that do not fit.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"expected q [B, T, Hq, Dk], k/v [B, T, Hkv, D]; got "
                     f"{q.shape=}, {k.shape=}, {v.shape=}")
  batch, seq_len, hq, dk = q.shape
  hkv = k.shape[2]
  if (k.shape[:2] != (batch, seq_len) or v.shape[:3] != k.shape[:3]
      or k.shape[3] != dk or hkv == 0 or hq % hkv):
    raise ValueError(f"{q.shape=}, {k.shape=} and {v.shape=} do not fit "
                     "(batch, length, GQA heads or Dk)")
  if block_size < tc.MIN_DOT_DIM or block_size & (block_size - 1):
    raise ValueError(f"{block_size=} must be a power of two >= "
                     f"{tc.MIN_DOT_DIM}")
  group = hq // hkv
  if block_q is None:
    block_q = default_block_q(group, seq_len)
  if block_q < 1 or block_q & (block_q - 1):
    raise ValueError(f"{block_q=} must be a power of two")
  if block_q * tc.next_pow2(group) < tc.MIN_DOT_DIM:
    raise ValueError(f"{block_q=} gives {block_q * tc.next_pow2(group)} rows "
                     f"for G={group}; plgpu.dot needs >= {tc.MIN_DOT_DIM}")
  if batch == 0 or seq_len == 0:
    return (jnp.zeros((batch, seq_len, hq, v.shape[-1]), q.dtype),
            jnp.zeros((batch, seq_len, hkv, -(-seq_len // block_size)),
                      jnp.float32))
  st = _Static(block_size=block_size,
               scale=dk ** -0.5 if scale is None else float(scale),
               seq_len=seq_len, group=group, block_q=block_q,
               num_warps=num_warps, num_stages=num_stages,
               interpret=tc.resolve_interpret(interpret))
  q, k, v = jax.tree.map(lax.stop_gradient, (q, k, v))
  return _attention_block_max(q, k, v, st)
