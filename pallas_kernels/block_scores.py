"""NSA selection scores: group-summed block importance P (Pallas Triton)."""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import group_tiles
from pallas_kernels import launch_config
from pallas_kernels import triton_compat as tc

# Default selection blocks per program (a tile of the output's last axis).
_BLOCK_SEL = 64


@dataclasses.dataclass(frozen=True)
class _Static:
  cmp_block: int  # l
  cmp_stride: int  # d
  sel_block: int  # l'
  scale: float
  num_cmp: int  # Tc
  group: int  # G
  num_kv_heads: int
  block_sel: int  # selection blocks per program
  launch: launch_config.LaunchConfig
  interpret: bool


def _coverage(i, j, st: _Static):
  """Eq. 9 weights W[i, j] = #{(m, n): j*a + m - n = i, m < a, n < b}.

  For fixed (i, j), n = j*a + m - i must lie in [0, b), so m ranges over
  [i - j*a, i - j*a + b - 1] intersected with [0, a - 1].

  Args:
    i: [block_k, 1] compressed token indices.
    j: [1, block_sel] selection block indices.
    st: static settings.

  Returns:
    float32 [block_k, block_sel].
  """
  a = st.sel_block // st.cmp_stride
  b = st.cmp_block // st.cmp_stride
  lo = jnp.maximum(i - j * a, 0)
  hi = jnp.minimum(i - j * a + b - 1, a - 1)
  return jnp.maximum(hi - lo + 1, 0).astype(jnp.float32)


def _block_scores_kernel(q_ref, k_ref, lse_ref, out_ref, *, st: _Static):
  """P[t, j] for a tile of positions and of selection blocks, one kv head.

  p_cmp = exp(scale * q.k_cmp - lse) is recomputed per [rows, block_k] tile
  from branch 1's lse (no new softmax statistics), mapped to selection blocks
  by a matmul with the Eq. 9 coverage matrix [block_k, block_sel], and the G
  heads of the group are summed. Nothing of size [T, Hq, Tc] reaches HBM.

  Refs: q [block_q, Gp, Dk], k [Tcp, Dk], lse [block_q, Gp]
  -> out [block_q, block_sel].
  """
  block_q, group_p, _ = q_ref.shape
  rows = block_q * group_p
  block_k = st.launch.block_k
  q, t = group_tiles.query_tile(q_ref)
  lse2 = lse_ref[...].reshape(rows) * tc.LOG2E
  real_head = lax.rem(jnp.arange(rows), group_p) < st.group  # [rows]
  j = pl.program_id(2) * st.block_sel + jnp.arange(st.block_sel)[None, :]
  # Compressed tokens that cover this tile's blocks and that the tile's last
  # query can see: i in [j0*a - b + 1, (j0 + block_sel)*a).
  a = st.sel_block // st.cmp_stride
  b = st.cmp_block // st.cmp_stride
  t_last = pl.program_id(1) * block_q + block_q - 1
  num_visible = jnp.where(
      t_last >= st.cmp_block - 1,
      lax.div(t_last - (st.cmp_block - 1), st.cmp_stride) + 1, 0)
  i_hi = jnp.minimum(jnp.minimum(num_visible, st.num_cmp),
                     (pl.program_id(2) + 1) * st.block_sel * a)
  i_lo = jnp.maximum(pl.program_id(2) * st.block_sel * a - b + 1, 0)

  def body(chunk, acc):
    start = pl.multiple_of(chunk * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]  # [block_k, Dk]
    s = tc.dot(q, k, trans_b=True) * (st.scale * tc.LOG2E)  # [rows, block_k]
    i = start + jnp.arange(block_k)
    visible = ((i[None, :] * st.cmp_stride + (st.cmp_block - 1) <= t[:, None])
               & real_head[:, None])
    p = jnp.where(visible, jnp.exp2(s - lse2[:, None]), 0.0)
    return acc + tc.dot(p, _coverage(i[:, None], j, st))  # [rows, block_sel]

  acc = lax.fori_loop(
      lax.div(i_lo, block_k), lax.div(i_hi + block_k - 1, block_k), body,
      jnp.zeros((rows, st.block_sel), jnp.float32))
  # GQA sharing: one score per (position, kv head), summed over the group.
  out_ref[...] = jnp.sum(acc.reshape(block_q, group_p, st.block_sel), axis=1)


def block_scores(q, k_cmp, lse, *, cmp_block: int, cmp_stride: int,
                 sel_block: int, scale: float | None = None,
                 interpret: bool | None = None,
                 block_q: int | None = None,
                 block_k: int | None = None,
                 num_warps: int | None = None,
                 num_stages: int | None = None,
                 block_sel: int | None = None):
  """Selection-block importance P of NSA section 3.3.2 (Eq. 8-10), fused.

  ``P[t, g, j] = sum_{h in group g} sum_{m<a} sum_{n<b} p_cmp[t, h, j*a+m-n]``
  with ``a = l'/d``, ``b = l/d``, ``p_cmp = exp(scale q.k_cmp - lse)`` the
  probabilities of branch 1 (0 where invisible or lse = -inf) and indices
  outside [0, Tc) dropped. Not differentiable (selection is not): inputs are
  wrapped in ``stop_gradient``. Top-k runs in XLA on the result.

  Args:
    q: [B, T, Hq, Dk] queries.
    k_cmp: [B, Tc, Hkv, Dk] compressed keys.
    lse: [B, T, Hq] float32 log-sum-exp of branch 1 (natural log).
    cmp_block: l. cmp_stride: d. sel_block: l'.
    scale: softmax scale, defaults to 1/sqrt(Dk); must be branch 1's.
    interpret: run in Pallas interpret mode; None means "when no GPU".
    block_q: query positions per program; None: from the launch table.
    block_k: compressed tokens per inner step; None: from the launch table.
    num_warps: Triton warps; None: from the launch table.
    num_stages: Triton pipelining stages; None: from the launch table.
    block_sel: selection blocks per program (power of two >= 16); None:
      min(64, next_pow2(Ts)).

  Returns:
    float32 [B, T, Hkv, Ts], Ts = ceil(T / l').

  Raises:
    ValueError: on inconsistent shapes or block sizes.
  """
  batch, seq_len, num_heads, head_dim = q.shape
  _, num_cmp, num_kv_heads, _ = k_cmp.shape
  if k_cmp.shape[0] != batch or k_cmp.shape[-1] != head_dim:
    raise ValueError(f"{q.shape=} and {k_cmp.shape=} disagree")
  if lse.shape != q.shape[:3]:
    raise ValueError(f"{lse.shape=} must be {q.shape[:3]}")
  if num_heads % num_kv_heads:
    raise ValueError(f"Hq={num_heads} is not a multiple of Hkv={num_kv_heads}")
  if cmp_block % cmp_stride or sel_block % cmp_stride:
    raise ValueError(f"{cmp_stride=} must divide {cmp_block=} and "
                     f"{sel_block=}")
  num_sel = -(-seq_len // sel_block)
  if num_cmp == 0:
    return jnp.zeros((batch, seq_len, num_kv_heads, num_sel), jnp.float32)
  group = num_heads // num_kv_heads
  launch = launch_config.resolve(
      "block_scores", group=group, seq_len=seq_len, num_keys=num_cmp,
      head_dim=head_dim, block_q=block_q, block_k=block_k,
      num_warps=num_warps, num_stages=num_stages)
  if block_sel is None:
    block_sel = min(tc.next_pow2(num_sel, tc.MIN_DOT_DIM), _BLOCK_SEL)
  if block_sel < tc.MIN_DOT_DIM or block_sel & (block_sel - 1):
    raise ValueError(f"{block_sel=} must be a power of two >= "
                     f"{tc.MIN_DOT_DIM}")
  st = _Static(cmp_block=cmp_block, cmp_stride=cmp_stride,
               sel_block=sel_block,
               scale=head_dim ** -0.5 if scale is None else float(scale),
               num_cmp=num_cmp, group=group, num_kv_heads=num_kv_heads,
               block_sel=block_sel, launch=launch,
               interpret=tc.resolve_interpret(interpret))
  q, k_cmp, lse = jax.tree.map(jax.lax.stop_gradient, (q, k_cmp, lse))
  return _block_scores(q, k_cmp, lse, st)[:, :seq_len, :, :num_sel]


def _block_scores(q, k_cmp, lse, st: _Static):
  launch = st.launch
  hkv = st.num_kv_heads
  seq_pad = tc.round_up(q.shape[1], launch.block_q)
  group_p = tc.next_pow2(st.group)
  dk_p = tc.next_pow2(q.shape[-1], tc.MIN_DOT_DIM)
  q5 = tc.group_heads(q, hkv, seq_pad, group_p, dk_p)
  k_p = tc.pad_axis(tc.pad_axis(k_cmp, 1, tc.round_up(st.num_cmp,
                                                      launch.block_k)), 3, dk_p)
  lse4 = group_tiles.group_rows(lse, hkv, seq_pad, group_p)
  sel_pad = tc.round_up(-(-q.shape[1] // st.sel_block), st.block_sel)
  batch = q.shape[0]

  def bg(x):  # Triton grids are 3-D: axis 0 enumerates (batch, kv head).
    return lax.div(x, hkv), lax.rem(x, hkv)

  return pl.pallas_call(
      functools.partial(_block_scores_kernel, st=st),
      grid=(batch * hkv, seq_pad // launch.block_q, sel_pad // st.block_sel),
      in_specs=[
          pl.BlockSpec((None, launch.block_q, None, group_p, dk_p),
                       lambda x, i, s: (bg(x)[0], i, bg(x)[1], 0, 0)),
          pl.BlockSpec((None, k_p.shape[1], None, dk_p),
                       lambda x, i, s: (bg(x)[0], 0, bg(x)[1], 0)),
          pl.BlockSpec((None, launch.block_q, None, group_p),
                       lambda x, i, s: (bg(x)[0], i, bg(x)[1], 0)),
      ],
      out_specs=pl.BlockSpec((None, launch.block_q, None, st.block_sel),
                             lambda x, i, s: (bg(x)[0], i, bg(x)[1], s)),
      out_shape=jax.ShapeDtypeStruct((batch, seq_pad, hkv, sel_pad),
                                     jnp.float32),
      compiler_params=tc.compiler_params(launch.num_warps, launch.num_stages),
      interpret=st.interpret,
      name="nsa_block_scores",
  )(q5, k_p, lse4)
