"""NSA branch 1: block-causal attention over compressed tokens (Pallas)."""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import group_tiles
from pallas_kernels import launch_config
from pallas_kernels import online_softmax
from pallas_kernels import triton_compat as tc


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable settings of one call (the custom_vjp's non-differentiable arg)."""

  block_size: int  # l
  stride: int  # d
  scale: float
  seq_len: int  # T
  num_cmp: int  # Tc
  group: int  # G
  head_dim_v: int  # Dv, to slice the padded output
  dk_parts: tuple[tuple[int, int], ...]  # tc.dot_parts of Dk (forward)
  launch: launch_config.LaunchConfig
  segment: int  # query positions per dK/dV program
  interpret: bool
  documents: bool  # document starts are an input (group_tiles.split_starts)
  offset: bool  # the query offset is an input (group_tiles.split_offset)

  @property
  def num_chunks(self) -> int:
    """Chunks of block_k compressed tokens (the padded Tc / block_k)."""
    return -(-self.num_cmp // self.launch.block_k)


def _first_invisible(t, block_size, stride, num_cmp):
  """Number of compressed tokens i with i*d + l - 1 <= t, for an int t >= 0."""
  count = jnp.where(t >= block_size - 1,
                    lax.div(t - (block_size - 1), stride) + 1, 0)
  return jnp.minimum(count, num_cmp)


def _tile_setup(q_ref, starts_ref, offset_ref, st: _Static):
  """The query tile and the chunks of compressed tokens it may see.

  Returns:
    (q [rows, Dk], t [rows] positions, lower [rows] document starts or None,
    first, end): chunks ``first .. end - 1`` hold every token a row of the
    tile can see.
  """
  block_q, group_p = q_ref.shape[:2]
  offset = group_tiles.read_offset(offset_ref)
  q, t = group_tiles.query_tile(q_ref, offset)
  # Compressed tokens the last query of the tile can see; earlier queries of
  # the tile see a prefix of them (mask below).
  last = pl.program_id(1) * block_q + block_q - 1
  if offset is not None:
    last = last + offset
  num_visible = _first_invisible(last, st.block_size, st.stride, st.num_cmp)
  end = lax.div(num_visible + st.launch.block_k - 1, st.launch.block_k)
  if starts_ref is None:
    return q, t, None, 0, end
  starts = starts_ref[...]  # [block_q], non-decreasing
  # Tokens with i*d below the tile's first document start are hidden from
  # every row of the tile: skip their chunks.
  first_token = lax.div(jnp.min(starts) + st.stride - 1, st.stride)
  first = jnp.minimum(lax.div(first_token, st.launch.block_k), end)
  return q, t, group_tiles.to_rows(starts, group_p), first, end


def _visible(i, t, lower, st: _Static):
  """[rows, keys]: token i's block is in t's past (and t's document)."""
  visible = i[None, :] * st.stride + (st.block_size - 1) <= t[:, None]
  if lower is not None:
    visible &= i[None, :] * st.stride >= lower[:, None]
  return visible


def _scores(q_parts, parts, k_ref, t, lower, chunk, st: _Static):
  """Raw dots q.k of one [rows, block_k] tile and its visibility mask.

  ``q_parts``: the tile's Dk column ``parts`` (``tc.dot_parts``), or the
  whole padded q as one part. Unscaled: ``online_softmax`` subtracts the
  row max from the raw dots before scaling, which keeps the backward's
  probabilities exact at large logits (issue 10, item 1).
  """
  block_k = st.launch.block_k
  start = pl.multiple_of(chunk * block_k, block_k)
  s = tc.dot_t_over_parts(q_parts, k_ref, pl.ds(start, block_k), parts)
  i = start + jnp.arange(block_k)
  return s, _visible(i, t, lower, st), start


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, st: _Static):
  """FlashAttention-2 forward for one (batch, query tile, kv head).

  Refs: q [block_q, Gp, Dk], k [Tcp, Dk], v [Tcp, Dv], (starts [block_q]),
  (offset [1]) -> o [block_q, Gp, Dv], lse [block_q, Gp] (natural log),
  m / log2l [block_q, Gp] (the backward's residuals: row max of the raw
  dots, log2 of the row sum). The online softmax (``online_softmax``) runs
  in base 2, exp2 being the native instruction.
  """
  starts_ref, refs = group_tiles.split_starts(refs, st.documents)
  offset_ref, (o_ref, lse_ref, m_ref, log2l_ref) = group_tiles.split_offset(
      refs, st.offset)
  _, t, lower, first, end = _tile_setup(q_ref, starts_ref, offset_ref, st)
  q_parts = group_tiles.query_parts(q_ref, st.dk_parts)

  def body(chunk, carry):
    s, visible, start = _scores(q_parts, st.dk_parts, k_ref, t, lower, chunk,
                                st)
    v = v_ref[pl.ds(start, st.launch.block_k), :]  # [block_k, Dv]
    return online_softmax.step(carry, s, visible, v, None,
                               st.scale * tc.LOG2E)

  carry = lax.fori_loop(first, end, body,
                        online_softmax.init(t.shape[0], v_ref.shape[-1]))
  out, m, log2l, lse = online_softmax.finalize(carry, st.scale)
  o_ref[...] = out.reshape(o_ref.shape).astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(lse_ref.shape)
  m_ref[...] = m.reshape(m_ref.shape)
  log2l_ref[...] = log2l.reshape(log2l_ref.shape)


def _probs(q, k_ref, t, lower, m, log2l, chunk, st: _Static):
  """Recomputed softmax probabilities of one tile (0 where not visible)."""
  s, visible, start = _scores([q], ((0, q.shape[1]),), k_ref, t, lower,
                              chunk, st)
  return online_softmax.probabilities(s, visible, m, log2l,
                                      st.scale * tc.LOG2E), start


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, m_ref, log2l_ref, delta_ref,
               *refs, st: _Static):
  """dQ = scale * sum_i dS_i k_i, dS = P * (dO.V^T - delta) (FA-2, Alg. 2).

  Refs: q [block_q, Gp, Dk], k [Tcp, Dk], v [Tcp, Dv], do [block_q, Gp, Dv],
  m / log2l / delta [block_q, Gp], (starts [block_q]), (offset [1])
  -> dq [block_q, Gp, Dk].
  """
  starts_ref, refs = group_tiles.split_starts(refs, st.documents)
  offset_ref, (dq_ref,) = group_tiles.split_offset(refs, st.offset)
  q, t, lower, first, end = _tile_setup(q_ref, starts_ref, offset_ref, st)
  rows, dk = q.shape
  do = do_ref[...].reshape(rows, do_ref.shape[-1])
  m = m_ref[...].reshape(rows)
  log2l = log2l_ref[...].reshape(rows)
  delta = delta_ref[...].reshape(rows)

  def body(chunk, dq):
    p, start = _probs(q, k_ref, t, lower, m, log2l, chunk, st)
    v = v_ref[pl.ds(start, st.launch.block_k), :]
    k = k_ref[pl.ds(start, st.launch.block_k), :]
    ds = p * (tc.dot(do, v, trans_b=True) - delta[:, None])
    return dq + tc.dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(first, end, body, jnp.zeros((rows, dk), jnp.float32))
  dq_ref[...] = (dq * st.scale).reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, m_ref, log2l_ref, delta_ref,
                *refs, st: _Static):
  """Partial dK, dV of one chunk of compressed tokens from one query segment.

  Program (b, seg * num_chunks + c, g) takes chunk c of ``block_k``
  compressed tokens and the query tiles of segment ``seg`` that see it, all
  G heads summed, and accumulates dV += P^T dO, dK += dS^T Q
  (FlashAttention-2 backward) in float32 registers. Splitting the queries
  into segments gives B * Hkv * (Tc / block_k) * S programs instead of
  B * Hkv * Tc / block_k long ones (Tc is T / d: few chunks, each seen by
  almost every query); XLA sums the S partials in a fixed order, so the
  result is deterministic.

  Refs: q [Tp, Gp, Dk], k [block_k, Dk], v [block_k, Dv], do [Tp, Gp, Dv],
  m / log2l / delta [Tp, Gp], (starts [Tp]), (offset [1]) -> float32
  dk [block_k, Dk], dv [block_k, Dv].
  """
  starts_ref, refs = group_tiles.split_starts(refs, st.documents)
  offset_ref, (dk_ref, dv_ref) = group_tiles.split_offset(refs, st.offset)
  offset = group_tiles.read_offset(offset_ref)
  seq_pad, group_p, dk = q_ref.shape
  block_q, block_k = st.launch.block_q, st.launch.block_k
  rows = block_q * group_p
  num_chunks = st.num_chunks
  chunk = lax.rem(pl.program_id(1), num_chunks)
  seg = lax.div(pl.program_id(1), num_chunks)
  k = k_ref[...]
  v = v_ref[...]
  i = chunk * block_k + jnp.arange(block_k)
  # The first query row that sees the chunk (rows hold positions o + row).
  first_row = chunk * block_k * st.stride + st.block_size - 1
  if offset is not None:
    first_row = jnp.maximum(first_row - offset, 0)

  def body(tile, carry):
    dk_acc, dv_acc = carry
    start = pl.multiple_of(tile * block_q, block_q)
    q = q_ref[pl.ds(start, block_q), :, :].reshape(rows, dk)
    do = do_ref[pl.ds(start, block_q), :, :].reshape(rows, v.shape[-1])
    m = m_ref[pl.ds(start, block_q), :].reshape(rows)
    log2l = log2l_ref[pl.ds(start, block_q), :].reshape(rows)
    delta = delta_ref[pl.ds(start, block_q), :].reshape(rows)
    t = start + lax.div(jnp.arange(rows), group_p)
    if offset is not None:
      t = t + offset
    lower = None if starts_ref is None else group_tiles.to_rows(
        starts_ref[pl.ds(start, block_q)], group_p)
    s = tc.dot(q, k, trans_b=True)  # [rows, block_k] raw dots
    visible = _visible(i, t, lower, st)
    p = online_softmax.probabilities(s, visible, m, log2l,
                                     st.scale * tc.LOG2E)
    ds = p * (tc.dot(do, v, trans_b=True) - delta[:, None])
    dv_acc = dv_acc + tc.dot(p.astype(do.dtype), do, trans_a=True)
    dk_acc = dk_acc + tc.dot(ds.astype(q.dtype), q, trans_a=True)
    return dk_acc, dv_acc

  seg_tiles = st.segment // block_q
  lo = jnp.maximum(lax.div(jnp.minimum(first_row, seq_pad), block_q),
                   seg * seg_tiles)
  hi = jnp.minimum(seq_pad // block_q, (seg + 1) * seg_tiles)
  dk_acc, dv_acc = lax.fori_loop(
      lo, jnp.maximum(lo, hi), body,
      (jnp.zeros((block_k, dk), jnp.float32),
       jnp.zeros((block_k, v.shape[-1]), jnp.float32)))
  dk_ref[...] = dk_acc * st.scale
  dv_ref[...] = dv_acc


def _pad_inputs(q, k_cmp, v_cmp, st: _Static, block_q: int):
  """Grouped q (T padded to a multiple of block_q), padded k_cmp, v_cmp."""
  hkv = k_cmp.shape[2]
  block_k = st.launch.block_k
  seq_pad = tc.round_up(st.seq_len, block_q)
  group_p = tc.next_pow2(st.group)
  dk_p = tc.next_pow2(q.shape[-1], tc.MIN_DOT_DIM)
  dv_p = tc.next_pow2(v_cmp.shape[-1], tc.MIN_DOT_DIM)
  tc_pad = tc.round_up(st.num_cmp, block_k)
  q5 = tc.group_heads(q, hkv, seq_pad, group_p, dk_p)
  k_p = tc.pad_axis(tc.pad_axis(k_cmp, 1, tc_pad), 3, dk_p)
  v_p = tc.pad_axis(tc.pad_axis(v_cmp, 1, tc_pad), 3, dv_p)
  return q5, k_p, v_p


def _fwd(q, k_cmp, v_cmp, starts, offset, st: _Static):
  block_q = st.launch.forward_block_q
  q5, k_p, v_p = _pad_inputs(q, k_cmp, v_cmp, st, block_q)
  batch, seq_pad, hkv, group_p, dk_p = q5.shape
  tc_pad, dv_p = v_p.shape[1], v_p.shape[-1]
  starts_spec, starts_arg = group_tiles.starts_input(
      starts, seq_pad, group_tiles.starts_spec(block_q))
  offset_spec, offset_arg = group_tiles.offset_input(offset)
  out, lse, m, log2l = pl.pallas_call(
      functools.partial(_fwd_kernel, st=st),
      grid=(batch, seq_pad // block_q, hkv),
      in_specs=[group_tiles.group_spec(block_q, group_p, dk_p),
                group_tiles.kv_spec(tc_pad, dk_p),
                group_tiles.kv_spec(tc_pad, dv_p)] + starts_spec + offset_spec,
      out_specs=[group_tiles.group_spec(block_q, group_p, dv_p)]
      + [group_tiles.group_spec(block_q, group_p)] * 3,
      out_shape=[
          jax.ShapeDtypeStruct((batch, seq_pad, hkv, group_p, dv_p), q.dtype)]
      + [jax.ShapeDtypeStruct((batch, seq_pad, hkv, group_p), jnp.float32)]
      * 3,
      compiler_params=tc.compiler_params(st.launch.num_warps,
                                         st.launch.num_stages),
      interpret=st.interpret,
      name="nsa_compressed_attention_fwd",
  )(q5, k_p, v_p, *starts_arg, *offset_arg)
  out = tc.ungroup_heads(out, st.seq_len, st.group, st.head_dim_v)
  lse = tc.ungroup_heads(lse, st.seq_len, st.group)
  return out, lse, m, log2l


def _bwd(q, k_cmp, v_cmp, starts, offset, out, lse, m, log2l, d_out, d_lse,
         st: _Static):
  """dQ, dK, dV; m and log2l are the forward's grouped residuals, offset
  the int32 [1] query offset or None."""
  block_q, block_k = st.launch.block_q, st.launch.block_k
  q5, k_p, v_p = _pad_inputs(q, k_cmp, v_cmp, st, block_q)
  batch, seq_pad, hkv, group_p, dk_p = q5.shape
  tc_pad, dv_p = v_p.shape[1], v_p.shape[-1]
  # The forward may tile (and so pad) the positions differently.
  m, log2l = (tc.pad_axis(x[:, :seq_pad], 1, seq_pad) for x in (m, log2l))
  do5, delta4 = group_tiles.delta_rows(out, d_out, q5, dv_p, d_lse=d_lse,
                                       lse=lse)
  params = tc.compiler_params(st.launch.num_warps, st.launch.num_stages)
  starts_spec, starts_arg = group_tiles.starts_input(
      starts, seq_pad, group_tiles.starts_spec(block_q))
  offset_spec, offset_arg = group_tiles.offset_input(offset)

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(batch, seq_pad // block_q, hkv),
      in_specs=[group_tiles.group_spec(block_q, group_p, dk_p),
                group_tiles.kv_spec(tc_pad, dk_p),
                group_tiles.kv_spec(tc_pad, dv_p),
                group_tiles.group_spec(block_q, group_p, dv_p)]
      + [group_tiles.group_spec(block_q, group_p)] * 3 + starts_spec
      + offset_spec,
      out_specs=group_tiles.group_spec(block_q, group_p, dk_p),
      out_shape=jax.ShapeDtypeStruct(q5.shape, q.dtype),
      compiler_params=params,
      interpret=st.interpret,
      name="nsa_compressed_attention_dq",
  )(q5, k_p, v_p, do5, m, log2l, delta4, *starts_arg, *offset_arg)

  num_chunks = st.num_chunks
  num_segments = -(-seq_pad // st.segment)

  def whole(*block):  # all query positions of one (batch, kv head)
    return pl.BlockSpec((None, seq_pad, None) + block,
                        lambda b, j, g: (b, 0, g) + (0,) * len(block))

  def chunk(dim):  # the program's chunk of block_k compressed tokens
    return pl.BlockSpec((None, block_k, None, dim),
                        lambda b, j, g: (b, lax.rem(j, num_chunks), g, 0))

  def partial(dim):  # one [block_k, dim] slot per (segment, chunk)
    return pl.BlockSpec((None, block_k, None, dim),
                        lambda b, j, g: (b, j, g, 0))

  starts_spec, _ = group_tiles.starts_input(
      starts, seq_pad, group_tiles.whole_starts_spec(seq_pad))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st),
      grid=(batch, num_segments * num_chunks, hkv),
      in_specs=[whole(group_p, dk_p), chunk(dk_p), chunk(dv_p),
                whole(group_p, dv_p), whole(group_p), whole(group_p),
                whole(group_p)] + starts_spec + offset_spec,
      out_specs=[partial(dk_p), partial(dv_p)],
      out_shape=[
          jax.ShapeDtypeStruct((batch, num_segments * tc_pad, hkv, dk_p),
                               jnp.float32),
          jax.ShapeDtypeStruct((batch, num_segments * tc_pad, hkv, dv_p),
                               jnp.float32)],
      compiler_params=params,
      interpret=st.interpret,
      name="nsa_compressed_attention_dkv",
  )(q5, k_p, v_p, do5, m, log2l, delta4, *starts_arg, *offset_arg)

  def sum_segments(x, like):  # fixed-order sum over segments: deterministic
    x = x.reshape(batch, num_segments, tc_pad, hkv, -1).sum(axis=1)
    return x[:, :st.num_cmp, :, :like.shape[-1]].astype(like.dtype)

  dq = tc.ungroup_heads(dq, st.seq_len, st.group, q.shape[-1])
  return dq, sum_segments(dk, k_cmp), sum_segments(dv, v_cmp)


# The dK/dV step splits the queries into at most this many segments.
_MAX_SEGMENTS = 16
_MIN_SEGMENT = 1024


def dkv_segment(seq_len: int, block_q: int) -> int:
  """Query positions per dK/dV program: >= 1024, <= 16 segments of T."""
  return tc.round_up(max(_MIN_SEGMENT, -(-seq_len // _MAX_SEGMENTS)),
                     block_q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _compressed_attention(q, k_cmp, v_cmp, starts, offset, st: _Static):
  return _fwd(q, k_cmp, v_cmp, starts, offset, st)[:2]


def _vjp_fwd(q, k_cmp, v_cmp, starts, offset, st: _Static):
  out, lse, m, log2l = _fwd(q, k_cmp, v_cmp, starts, offset, st)
  return (out, lse), (q, k_cmp, v_cmp, starts, offset, out, lse, m, log2l)


def _vjp_bwd(st: _Static, residuals, cotangents):
  d_out, d_lse = cotangents
  # The integer document starts and query offset have no cotangent.
  return (*_bwd(*residuals, d_out, d_lse, st), None, None)


_compressed_attention.defvjp(_vjp_fwd, _vjp_bwd)


def compressed_attention(q, k_cmp, v_cmp, *, block_size: int, stride: int,
                         scale: float | None = None,
                         interpret: bool | None = None,
                         block_q: int | None = None,
                         block_k: int | None = None,
                         num_warps: int | None = None,
                         num_stages: int | None = None,
                         segment: int | None = None,
                         doc_starts=None,
                         q_offset=0,
                         fwd_block_q: int | None = None):
  """NSA branch 1 (section 3.3.1) as a fused Pallas Triton kernel.

  Query t sees compressed token i iff its whole block is in the past,
  ``i*d + l - 1 <= t``, and, with ``doc_starts``, in t's document,
  ``i*d >= doc_starts[t]``; row r of q is query t = q_offset + r. One
  program per (batch, tile of ``block_q`` query positions, kv head) holds
  the queries of all G heads of the group (``block_q * next_pow2(G)``
  rows) and runs a FlashAttention-2 online softmax over the visible
  compressed tokens, ``block_k`` at a time. The backward is
  FlashAttention-2's: a dQ kernel on the same grid and a dK/dV kernel over
  (chunk of compressed tokens, segment of queries) pairs, each summing the G
  heads of its group; the segments' float32 partials are summed in XLA (no
  atomics, deterministic). Differentiable in ``out`` and ``lse``.

  Args:
    q: [B, T, Hq, Dk] queries, Hq = G * Hkv.
    k_cmp: [B, Tc, Hkv, Dk] compressed keys.
    v_cmp: [B, Tc, Hkv, Dv] compressed values (Dv may differ from Dk).
    block_size: l, raw tokens per compressed token.
    stride: d, distance between consecutive compressed blocks.
    scale: softmax scale, defaults to 1/sqrt(Dk).
    interpret: run in Pallas interpret mode; None means "when no GPU".
    block_q: query positions per program (power of two); None: from the
      launch table.
    block_k: compressed tokens per inner step (power of two, >= 16).
    fwd_block_q: query positions per forward program, if not block_q's;
      None: the launch table's (which has its own for some shapes), or
      block_q when that is given.
    num_warps: Triton warps; None: from the launch table.
    num_stages: Triton pipelining stages; None: from the launch table.
    segment: query positions per dK/dV program (a multiple of block_q);
      None: ``dkv_segment``.
    doc_starts: optional int32 [B, T], non-decreasing, ``<= t``: the first
      position of each query's document (packed sequences). A program skips
      the chunks of tokens before its first row's document.
    q_offset: position of q's first row, an int or an integer scalar array
      (traced inside ``shard_map``: context parallelism, one shard's
      queries against the compressed tokens of the whole sequence). Any
      other value than the int 0 is a kernel input read once per program;
      k_cmp then holds the tokens of a sequence of at least
      ``q_offset + T`` positions (tokens past a query's reach are masked).

  Returns:
    (out [B, T, Hq, Dv] in q.dtype, lse [B, T, Hq] float32 natural log).
    Keys/values with a non-finite entry are zeroed before the kernel (a
    masked one contributes nothing); a query that can see one gets a NaN
    output (its lse is that of the other tokens).
    Queries that see no compressed token (t < l - 1, or Tc = 0) get out = 0
    and lse = -inf, with zero (never NaN) gradients.

  Raises:
    ValueError: on inconsistent shapes or block sizes; a concrete q_offset
      below 0 or whose queries see more tokens than k_cmp holds;
      doc_starts with a q_offset.
    TypeError: a q_offset that is not an integer scalar.
  """
  batch, seq_len, num_heads, head_dim = q.shape
  _, num_cmp, num_kv_heads, _ = k_cmp.shape
  offset_arg = group_tiles.offset_operand(q_offset)  # None: no offset
  offset = group_tiles.offset_value(offset_arg)  # None: traced
  if k_cmp.shape[0] != batch or v_cmp.shape[:3] != k_cmp.shape[:3]:
    raise ValueError(f"{q.shape=}, {k_cmp.shape=} and {v_cmp.shape=} "
                     "disagree on batch, Tc or kv heads")
  if k_cmp.shape[-1] != head_dim:
    raise ValueError(f"{q.shape=} and {k_cmp.shape=} disagree on Dk")
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(f"Hq={num_heads} is not a multiple of Hkv={num_kv_heads}")
  if block_size % stride:
    raise ValueError(f"{block_size=} must be a multiple of {stride=}")
  if doc_starts is not None and offset_arg is not None:
    raise ValueError("doc_starts need the whole sequence: q_offset must be "
                     f"0, got {q_offset!r}")
  if offset_arg is None:
    expected = max(0, (seq_len - block_size) // stride + 1)
    if num_cmp > expected:
      raise ValueError(f"Tc={num_cmp} compressed tokens, but T={seq_len} "
                       f"with l={block_size}, d={stride} has only {expected}")
  elif offset is not None:  # a concrete offset: the sequence is longer
    reach = max(0, (offset + seq_len - block_size) // stride + 1)
    if num_cmp < reach:
      raise ValueError(
          f"queries at positions {offset} .. {offset + seq_len - 1} see "
          f"{reach} compressed tokens (l={block_size}, d={stride}), but "
          f"k_cmp holds only Tc={num_cmp}")
  scale = head_dim ** -0.5 if scale is None else float(scale)
  out_shape = (batch, seq_len, num_heads, v_cmp.shape[-1])
  if num_cmp == 0:
    # Nothing is visible: no kernel launch with an empty dimension.
    return (jnp.zeros(out_shape, q.dtype),
            jnp.full((batch, seq_len, num_heads), -jnp.inf, jnp.float32))
  group = num_heads // num_kv_heads
  launch = launch_config.resolve(
      "compressed", group=group, seq_len=seq_len, num_keys=num_cmp,
      head_dim=max(head_dim, v_cmp.shape[-1]),
      itemsize=jnp.dtype(q.dtype).itemsize, block_q=block_q, block_k=block_k,
      num_warps=num_warps, num_stages=num_stages, fwd_block_q=fwd_block_q)
  if segment is not None and (segment < 1 or segment % launch.block_q):
    raise ValueError(f"{segment=} must be a positive multiple of "
                     f"block_q={launch.block_q}")
  if doc_starts is not None and doc_starts.shape != (batch, seq_len):
    raise ValueError(f"{doc_starts.shape=} must be [B, T] = "
                     f"{(batch, seq_len)}")
  st = _Static(block_size=block_size, stride=stride, scale=scale,
               seq_len=seq_len, num_cmp=num_cmp, group=group,
               head_dim_v=v_cmp.shape[-1], dk_parts=tc.dot_parts(head_dim),
               launch=launch,
               segment=(dkv_segment(seq_len, launch.block_q)
                        if segment is None else segment),
               interpret=tc.resolve_interpret(interpret),
               documents=doc_starts is not None,
               offset=offset_arg is not None)
  bad = ~(jnp.isfinite(k_cmp).all(-1) & jnp.isfinite(v_cmp).all(-1))
  k_cmp = jnp.where(bad[..., None], jnp.zeros((), k_cmp.dtype), k_cmp)
  v_cmp = jnp.where(bad[..., None], jnp.zeros((), v_cmp.dtype), v_cmp)
  out, lse = _compressed_attention(q, k_cmp, v_cmp, doc_starts, offset_arg,
                                   st)
  sees_bad = _sees_bad(bad, doc_starts, offset_arg, st)  # [B, T, Hkv]
  sees_bad = jnp.repeat(sees_bad, group, axis=2)[..., None]
  return jnp.where(sees_bad, jnp.asarray(jnp.nan, out.dtype), out), lse


def _sees_bad(bad, doc_starts, offset, st: _Static):
  """bool [B, T, Hkv]: the query sees a token whose k or v is not finite.

  Query t sees the tokens ``lo(t) <= i < hi(t)``: ``hi`` counts the blocks
  ending by t, ``lo = ceil(doc_starts[t] / d)`` (0 without documents). A
  difference of running counts of bad tokens finds them; such a query gets
  NaN, as on every path. ``offset``: None or int32 [1], q's first position.
  """
  batch, num_cmp, _ = bad.shape
  count = jnp.cumsum(bad.astype(jnp.int32), axis=1)
  count = jnp.pad(count, ((0, 0), (1, 0), (0, 0)))  # [B, Tc + 1, Hkv]
  t = jnp.arange(st.seq_len, dtype=jnp.int32)
  if offset is not None:
    t = t + offset
  hi = jnp.broadcast_to(_first_invisible(t, st.block_size, st.stride,
                                         num_cmp), (batch, st.seq_len))
  lo = (jnp.zeros_like(hi) if doc_starts is None else jnp.minimum(
      lax.div(doc_starts.astype(jnp.int32) + st.stride - 1, st.stride), hi))
  at = lambda i: jnp.take_along_axis(count, i[..., None], axis=1)
  return at(hi) - at(lo) > 0
