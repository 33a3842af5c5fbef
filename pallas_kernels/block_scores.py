"""NSA selection scores: group-summed block importance P (Pallas Triton)."""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import group_tiles
from pallas_kernels import triton_compat as tc

# Query rows (positions x padded group) per program by input itemsize, and
# selection blocks per inner step. Measured on an H100 (T = 64k, Hq 64 /
# Hkv 4 / D 128, bf16, scores + top-n): 64 rows, 4 warps, 2 stages took
# 13.1 ms; 128 rows 14.3-15.0 ms; 256 rows 18-20 ms; 8 warps at 64 rows 27 ms.
_ROWS = {2: 64, 4: 64}
_BLOCK_SEL = 16


@dataclasses.dataclass(frozen=True)
class ScoreLaunch:
  """One launch of the block-score kernel.

  Attributes:
    block_q: query positions per program (``block_q * next_pow2(G)`` rows).
    block_sel: selection blocks per inner step; the step reads
      ``block_sel * l'/d`` compressed tokens.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
  """

  block_q: int
  block_sel: int = _BLOCK_SEL
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_sel"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"ScoreLaunch.{name}={value} must be a power of two")
    if self.block_sel < tc.MIN_DOT_DIM:
      raise ValueError(f"ScoreLaunch.block_sel={self.block_sel} must be >= "
                       f"{tc.MIN_DOT_DIM} (it is a matmul dimension)")
    if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
      raise ValueError(f"bad num_warps={self.num_warps} or "
                       f"num_stages={self.num_stages}")


def default_launch(group: int, seq_len: int, dtype,
                   head_dim: int = 128) -> ScoreLaunch:
  """The launch used when the caller gives none: >= 16 rows, dtype-sized.

  Float32 tiles with a head dim padded to 256 get half the rows and no
  pipelining, or they overflow the H100's shared memory.
  """
  group_p = tc.next_pow2(group)
  itemsize = jnp.dtype(dtype).itemsize
  rows = _ROWS[itemsize]
  wide = itemsize >= 4 and tc.next_pow2(head_dim) > 128
  if wide:
    rows //= 2
  block_q = max(max(1, tc.MIN_DOT_DIM // group_p),
                min(rows // group_p, tc.next_pow2(seq_len)))
  return ScoreLaunch(block_q=block_q, num_warps=8 if rows >= 128 else 4,
                     num_stages=1 if wide else 2)


@dataclasses.dataclass(frozen=True)
class _Static:
  cmp_block: int  # l
  cmp_stride: int  # d
  sel_block: int  # l'
  scale: float
  seq_len: int  # T of the whole sequence
  q_offset: int  # position of this call's first query
  group: int  # G
  launch: ScoreLaunch
  interpret: bool
  documents: bool  # document starts are an input (group_tiles.split_starts)
  dk_parts: tuple[tuple[int, int], ...]  # tc.dot_parts of Dk

  @property
  def ratio(self) -> int:
    """a = l'/d: stride chunks per selection block."""
    return self.sel_block // self.cmp_stride

  @property
  def block_k(self) -> int:
    """Compressed tokens read per inner step."""
    return self.launch.block_sel * self.ratio


def coverage(token, block, cmp_block: int, cmp_stride: int, sel_block: int):
  """Eq. 9 weight of compressed token ``token`` in selection block ``block``.

  ``#{(m, n): block*a + m - n = token, 0 <= m < a, 0 <= n < b}`` with
  ``a = l'/d``, ``b = l/d``. It depends on ``token - block*a`` only, so
  chunk-local indices give the same weights.

  Args:
    token: int array of compressed-token indices.
    block: int array of selection-block indices (broadcast with ``token``).
    cmp_block, cmp_stride, sel_block: l, d, l'.

  Returns:
    float32 weights in [0, b].
  """
  a = sel_block // cmp_stride
  b = cmp_block // cmp_stride
  r = token - block * a
  lo = jnp.maximum(r, 0)
  hi = jnp.minimum(r + b - 1, a - 1)
  return jnp.maximum(hi - lo + 1, 0).astype(jnp.float32)


def _split_dot(p, w):
  """p @ w for float32 p and small-integer w, near float32 accuracy.

  p = hi + mid + lo in bfloat16 (8 mantissa bits each): three bf16 tensor-core
  matmuls with float32 accumulation replace one IEEE float32 matmul (which
  Triton runs on the CUDA cores). w's entries are exact in bfloat16.
  """
  hi = p.astype(jnp.bfloat16)
  rest = p - hi.astype(jnp.float32)
  mid = rest.astype(jnp.bfloat16)
  lo = (rest - mid.astype(jnp.float32)).astype(jnp.bfloat16)
  w = w.astype(jnp.bfloat16)
  return tc.dot(lo, w) + tc.dot(mid, w) + tc.dot(hi, w)


def _scores_kernel(q_ref, k_ref, lse_ref, *refs, st: _Static):
  """P[t, j] for one tile of positions, every causal selection block.

  Step c reads compressed tokens [c*bk, (c+1)*bk), bk = block_sel * a, and
  recomputes their probabilities p = exp(scale q.k - lse) from branch 1's
  lse ([rows, bk], rows = positions x heads of the GQA group). A matmul with
  the Eq. 9 coverage [bk, block_sel] maps them to selection blocks
  [c*block_sel, (c+1)*block_sel); the b-1 last tokens of a step also cover
  the next step's first block, carried as one [rows] vector. The G heads are
  summed and the [block_q, block_sel] tile is stored. Columns past the
  tile's last causal block are not written (the top-n kernel masks them).

  With documents a token scores only if its block lies in the row's
  document (``i*d >= starts[t]``), and the steps whose blocks all lie before
  the tile's first document start are skipped; their columns are not
  written either (no row has them as candidates).

  Refs: q [block_q, Gp, Dk], k [Tk, Dk], lse [block_q, Gp],
  (starts [block_q]) -> out [block_q, Ts_p] float32.
  """
  starts_ref, (out_ref,) = group_tiles.split_starts(refs, st.documents)
  block_q, group_p, _ = q_ref.shape
  rows = block_q * group_p
  block_sel, block_k = st.launch.block_sel, st.block_k
  t = group_tiles.row_positions(block_q, group_p) + st.q_offset
  q_parts = group_tiles.query_parts(q_ref, st.dk_parts)
  lse2 = lse_ref[...].reshape(rows) * tc.LOG2E
  real_head = lax.rem(jnp.arange(rows), group_p) < st.group
  token = jnp.arange(block_k)
  sel = jnp.arange(block_sel)
  weights = coverage(token[:, None], sel[None, :], st.cmp_block,
                     st.cmp_stride, st.sel_block)  # [bk, block_sel]
  spill = coverage(token, block_sel, st.cmp_block, st.cmp_stride,
                   st.sel_block)  # [bk]: into the next step's first block
  t_last = jnp.minimum(st.q_offset + (pl.program_id(1) + 1) * block_q,
                       st.seq_len) - 1
  num_blocks = lax.div(t_last, st.sel_block) + 1
  num_steps = lax.div(num_blocks + block_sel - 1, block_sel)
  first_step, lower = 0, None
  if starts_ref is not None:
    starts = starts_ref[...]  # [block_q], non-decreasing
    lower = group_tiles.to_rows(starts, group_p)
    first_step = jnp.minimum(
        lax.div(jnp.min(starts), st.sel_block * block_sel), num_steps)

  def body(step, carry):
    start = pl.multiple_of(step * block_k, block_k)
    s = tc.dot_t_over_parts(q_parts, k_ref, pl.ds(start, block_k),
                            st.dk_parts) * (st.scale * tc.LOG2E)  # [rows, bk]
    i = start + token
    visible = i[None, :] * st.cmp_stride + (st.cmp_block - 1) <= t[:, None]
    if st.group < group_p:  # padded heads
      visible &= real_head[:, None]
    if lower is not None:
      visible &= i[None, :] * st.cmp_stride >= lower[:, None]
    p = jnp.where(visible, jnp.exp2(s - lse2[:, None]), 0.0)
    scores = _split_dot(p, weights)  # [rows, block_sel]
    scores += jnp.where(sel[None, :] == 0, carry[:, None], 0.0)
    # GQA sharing: one score per (position, kv head), summed over the group.
    out_ref[:, pl.ds(pl.multiple_of(step * block_sel, block_sel),
                     block_sel)] = jnp.sum(
                         scores.reshape(block_q, group_p, block_sel), axis=1)
    return jnp.sum(p * spill[None, :], axis=1)

  lax.fori_loop(first_step, num_steps, body, jnp.zeros((rows,), jnp.float32))


def check_block_sizes(cmp_block: int, cmp_stride: int, sel_block: int):
  """Raises ValueError unless the kernel can tile these block sizes."""
  if cmp_block % cmp_stride or sel_block % cmp_stride:
    raise ValueError(f"{cmp_stride=} must divide {cmp_block=} and "
                     f"{sel_block=}")
  ratio = sel_block // cmp_stride
  if ratio & (ratio - 1):
    raise ValueError(f"the Pallas block scores need sel_block / cmp_stride "
                     f"= {ratio} to be a power of two")


def check_inputs(q, k_cmp, lse, cmp_block: int, cmp_stride: int,
                 sel_block: int):
  """Raises ValueError unless q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk] and
  lse [B, T, Hq] fit together and the block sizes can be tiled."""
  batch, _, num_heads, head_dim = q.shape
  num_kv_heads = k_cmp.shape[2]
  if k_cmp.shape[0] != batch or k_cmp.shape[-1] != head_dim:
    raise ValueError(f"{q.shape=} and {k_cmp.shape=} disagree")
  if lse.shape != q.shape[:3]:
    raise ValueError(f"{lse.shape=} must be {q.shape[:3]}")
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(f"Hq={num_heads} is not a multiple of Hkv={num_kv_heads}")
  check_block_sizes(cmp_block, cmp_stride, sel_block)


def padded_scores(q, k_cmp, lse, *, cmp_block: int, cmp_stride: int,
                  sel_block: int, scale: float, seq_len: int, q_offset: int,
                  launch: ScoreLaunch, interpret: bool, doc_starts=None):
  """Raw kernel output for queries at positions q_offset .. q_offset + Tq - 1.

  Args:
    q: [B, Tq, Hq, Dk] a slice of the queries; k_cmp: [B, Tc, Hkv, Dk] all
      compressed keys; lse: float32 [B, Tq, Hq] for the same queries.
    seq_len: T of the whole sequence.
    q_offset: position of q's first row.
    doc_starts: optional int32 [B, Tq] (or already padded to Tq_p with
      ``group_tiles.pad_starts``): document starts of the same queries.

  Returns:
    float32 [B, Tq_p, Hkv, Ts_p]: Tq_p = Tq rounded up to block_q, Ts_p the
    power of two >= max(Ts, block_sel). Columns past a tile's last causal
    block, or before the block of its first document start, hold garbage.
  """
  batch, num_q, num_heads, head_dim = q.shape
  hkv = k_cmp.shape[2]
  group = num_heads // hkv
  st = _Static(cmp_block=cmp_block, cmp_stride=cmp_stride,
               sel_block=sel_block, scale=scale, seq_len=seq_len,
               q_offset=q_offset, group=group, launch=launch,
               interpret=interpret, documents=doc_starts is not None,
               dk_parts=tc.dot_parts(head_dim))
  block_q, block_sel = launch.block_q, launch.block_sel
  seq_pad = tc.round_up(num_q, block_q)
  group_p = tc.next_pow2(group)
  dk_p = tc.next_pow2(head_dim, tc.MIN_DOT_DIM)
  sel_pad = tc.next_pow2(-(-seq_len // sel_block), block_sel)
  q5 = tc.group_heads(q, hkv, seq_pad, group_p, dk_p)
  k_p = tc.pad_axis(tc.pad_axis(k_cmp, 1, sel_pad * st.ratio), 3, dk_p)
  lse4 = group_tiles.group_rows(lse, hkv, seq_pad, group_p)

  def bg(x):  # Triton grids are 3-D at most: axis 0 is (batch, kv head).
    return lax.div(x, hkv), lax.rem(x, hkv)

  starts_spec, starts_arg = [], []
  if doc_starts is not None:
    starts_spec = [pl.BlockSpec((None, block_q), lambda x, i: (bg(x)[0], i))]
    starts_arg = [group_tiles.pad_starts(doc_starts, seq_pad, seq_len)]

  return pl.pallas_call(
      functools.partial(_scores_kernel, st=st),
      grid=(batch * hkv, seq_pad // block_q),
      in_specs=[
          pl.BlockSpec((None, block_q, None, group_p, dk_p),
                       lambda x, i: (bg(x)[0], i, bg(x)[1], 0, 0)),
          pl.BlockSpec((None, k_p.shape[1], None, dk_p),
                       lambda x, i: (bg(x)[0], 0, bg(x)[1], 0)),
          pl.BlockSpec((None, block_q, None, group_p),
                       lambda x, i: (bg(x)[0], i, bg(x)[1], 0)),
      ] + starts_spec,
      out_specs=pl.BlockSpec((None, block_q, None, sel_pad),
                             lambda x, i: (bg(x)[0], i, bg(x)[1], 0)),
      out_shape=jax.ShapeDtypeStruct((batch, seq_pad, hkv, sel_pad),
                                     jnp.float32),
      compiler_params=tc.compiler_params(launch.num_warps,
                                         launch.num_stages),
      interpret=interpret,
      name="nsa_block_scores",
  )(q5, k_p, lse4, *starts_arg)


def block_scores(q, k_cmp, lse, *, cmp_block: int, cmp_stride: int,
                 sel_block: int, scale: float | None = None,
                 interpret: bool | None = None,
                 launch: ScoreLaunch | None = None,
                 doc_starts=None):
  """Selection-block importance P of NSA section 3.3.2 (Eq. 8-10), fused.

  ``P[t, g, j] = sum_{h in group g} sum_{m<a} sum_{n<b} p_cmp[t, h, j*a+m-n]``
  with ``a = l'/d``, ``b = l/d``, ``p_cmp = exp(scale q.k_cmp - lse)`` the
  probabilities of branch 1 (0 where invisible or lse = -inf) and indices
  outside [0, Tc) dropped. Not differentiable (selection is not): inputs are
  wrapped in ``stop_gradient``. ``block_select.select_blocks`` runs the same
  kernel and ranks its output on the GPU; this entry point returns the
  scores themselves (non-causal blocks, j > t // l', are 0).

  Args:
    q: [B, T, Hq, Dk] queries.
    k_cmp: [B, Tc, Hkv, Dk] compressed keys.
    lse: [B, T, Hq] float32 log-sum-exp of branch 1 (natural log).
    cmp_block: l. cmp_stride: d. sel_block: l'; l'/d a power of two.
    scale: softmax scale, defaults to 1/sqrt(Dk); must be branch 1's.
    interpret: run in Pallas interpret mode; None means "when no GPU".
    launch: tile sizes; None: ``default_launch``.
    doc_starts: optional int32 [B, T], non-decreasing, ``<= t``: the first
      position of each query's document. A token scores only if its whole
      block is in the query's document; blocks before the one holding the
      document start are 0, as non-causal ones.

  Returns:
    float32 [B, T, Hkv, Ts], Ts = ceil(T / l').

  Raises:
    ValueError: on inconsistent shapes or block sizes.
  """
  check_inputs(q, k_cmp, lse, cmp_block, cmp_stride, sel_block)
  batch, seq_len, num_heads, head_dim = q.shape
  _, num_cmp, num_kv_heads, _ = k_cmp.shape
  num_sel = -(-seq_len // sel_block)
  if num_cmp == 0 or seq_len == 0:
    return jnp.zeros((batch, seq_len, num_kv_heads, num_sel), jnp.float32)
  if launch is None:
    launch = default_launch(num_heads // num_kv_heads, seq_len, q.dtype,
                            head_dim)
  q, k_cmp, lse = jax.tree.map(jax.lax.stop_gradient, (q, k_cmp, lse))
  scores = padded_scores(
      q, k_cmp, lse, cmp_block=cmp_block, cmp_stride=cmp_stride,
      sel_block=sel_block,
      scale=head_dim ** -0.5 if scale is None else float(scale),
      seq_len=seq_len, q_offset=0, launch=launch,
      interpret=tc.resolve_interpret(interpret),
      doc_starts=doc_starts)[:, :seq_len, :, :num_sel]
  j = jnp.arange(num_sel)[None, None, :]
  causal = j <= (jnp.arange(seq_len) // sel_block)[None, :, None]
  if doc_starts is not None:
    causal &= j >= (doc_starts // sel_block)[..., None]
  return jnp.where(causal[:, :, None, :], scores, 0.0)
