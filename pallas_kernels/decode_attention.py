"""Block-sparse decode attention (Pallas Triton): one query a row, any table."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import decode_merge
from pallas_kernels import triton_compat as tc


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable settings of one call."""

  block_size: int  # keys per block
  scale: float
  slots_per_split: int  # table slots walked by one program (power of two)
  num_splits: int  # programs per (batch, kv head)
  window: int | None  # keys also need s > t - window
  ring: bool  # the cache is a ring buffer: slot x holds t - ((t - x) mod S)
  key_stride: int  # slot x holds position x * key_stride + key_offset
  key_offset: int
  num_warps: int
  num_stages: int
  interpret: bool


def _load_block(ref, blk, block_size):
  return ref[pl.ds(pl.multiple_of(blk * block_size, block_size), block_size),
             :]


def _decode_kernel(q_ref, *refs, sts: tuple[_Static, ...]):
  """Online softmax (FlashAttention-2) over one split of a table row.

  Program (b, g, split) walks slots ``[split * n_s, (split + 1) * n_s)`` of
  row (b, g) of a block table with the whole GQA group as rows (NSA
  section 3.4), and writes a partial output normalised by its own sum plus
  its log-sum-exp; ``combine`` merges the splits (flash-decoding). Several
  sources (K/V and table, e.g. NSA's selected and window branches) share
  one launch: the splits of source 0 come first, then those of source 1.

  Refs: q [Gp, Dk]; per source k [S, Dk], v [S, Dv], idx [n_s]; t [Gp]
  (the query position, equal on all rows) -> o [Gp, Dv] float32, lse [Gp]
  float32, (scores [Gs, W] float32, one source only: see ``_walk``).
  """
  num = len(sts)
  t_ref, out_refs = refs[3 * num], refs[3 * num + 1:]
  q = q_ref[...]  # [Gp, Dk]
  t_max = jnp.max(t_ref[...])  # the row's query position
  split, start = pl.program_id(2), 0
  for source, st in enumerate(sts):
    walk = functools.partial(_walk, q, t_max, *refs[3 * source:3 * source + 3],
                             *out_refs, st=st)
    if num == 1:
      walk()
    else:
      pl.when((split >= start) & (split < start + st.num_splits))(walk)
    start += st.num_splits


def _walk(q, t_max, k_ref, v_ref, idx_ref, o_ref, lse_ref, s_ref=None, *,
          st: _Static):
  """One program's walk over its slots; see ``_decode_kernel``.

  Slots after the split's last used one are not walked. With ``s_ref``
  (scores [Gs, W] float32) it also writes ``scale * q.k * log2(e)`` of every
  key of a used slot at its column x, -inf where masked.
  """
  rows = q.shape[0]
  offsets = jnp.arange(st.block_size)
  ring_size = k_ref.shape[0]
  slots = jnp.arange(st.slots_per_split)
  num_used = jnp.max(jnp.where(idx_ref[...] >= 0, slots + 1, 0))

  def body(i, carry):
    acc, m, l = carry
    blk = idx_ref[i]
    use = blk >= 0
    blk = jnp.maximum(blk, 0)  # an empty slot loads block 0, all masked
    # Keys 0 <= s <= t (and s > t - w) of a used block; the others, garbage
    # included, are masked in the scores and zeroed in the values.
    slot = blk * st.block_size + offsets  # [l']
    if st.ring:  # the newest position at or before t that maps to the slot
      pos = t_max - lax.rem(t_max - slot + ring_size, ring_size)
    else:
      pos = slot * st.key_stride + st.key_offset
    keep = use & (pos <= t_max) & (pos >= 0)
    if st.window is not None:
      keep &= pos > t_max - st.window
    k = _load_block(k_ref, blk, st.block_size)  # [l', Dk]
    k = jnp.where(keep[:, None], k, jnp.zeros((), k.dtype))
    s = tc.dot(q, k, trans_b=True) * (st.scale * tc.LOG2E)  # [Gp, l']
    s = jnp.where(keep[None, :], s, -jnp.inf)
    if s_ref is not None:
      s_rows = _first_rows(s, s_ref.shape[0])

      @pl.when(use)
      def _():
        s_ref[:, pl.ds(pl.multiple_of(blk * st.block_size, st.block_size),
                       st.block_size)] = s_rows
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    v = _load_block(v_ref, blk, st.block_size)  # [l', Dv]
    v = jnp.where(keep[:, None], v, jnp.zeros((), v.dtype))
    acc = alpha[:, None] * acc + tc.dot(p.astype(v.dtype), v)
    return acc, m_new, alpha * l + jnp.sum(p, axis=1)

  carry = (jnp.zeros((rows, v_ref.shape[-1]), jnp.float32),
           jnp.full((rows,), -jnp.inf, jnp.float32),
           jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(0, num_used, body, carry)
  seen = l > 0.0
  o_ref[...] = acc / jnp.where(seen, l, 1.0)[:, None]
  lse_ref[...] = jnp.where(
      seen, (m + jnp.log2(jnp.where(seen, l, 1.0))) * tc.LN2, -jnp.inf)


def grouped_query(q, num_kv_heads: int):
  """[B, Hq, Dk] -> [B, Hkv, Gp, Dk_p] (``tc.group_heads`` of one position):
  G padded to a power of two >= 16, Dk to one >= 16."""
  b, hq, dk = q.shape
  group = hq // num_kv_heads
  return tc.group_heads(q[:, None], num_kv_heads, 1,
                        tc.next_pow2(group, tc.MIN_DOT_DIM),
                        tc.next_pow2(dk, tc.MIN_DOT_DIM))[:, 0]


def _first_rows(x, num: int):
  """The first ``num`` rows of x [R, C] (num divides R): a masked sum over
  the row groups of a reshape, as Triton tensors cannot be sliced."""
  if num == x.shape[0]:
    return x
  x = x.reshape(x.shape[0] // num, num, x.shape[1])
  first = lax.broadcasted_iota(jnp.int32, x.shape, 0) == 0
  return jnp.sum(jnp.where(first, x, 0.0), axis=0)


def scores_rows(num_heads: int, num_kv_heads: int) -> int:
  """Rows of the emitted scores per kv head: G rounded up to a power of two
  (the kernel's rows are padded to >= 16, the scores are not)."""
  return tc.next_pow2(num_heads // num_kv_heads)


def launch(q4, sources, lengths, scores_width: int | None = None,
           scores_rows: int | None = None):
  """Runs the decode kernel; returns each split's partial result.

  Args:
    q4: [B, Hkv, Gp, Dk_p] from ``grouped_query``.
    sources: tuple of (k [B, S, Hkv, Dk], v [B, S, Hkv, Dv], block_table
      int32 [B, Hkv, n], settings): one launch walks them all (S, n and the
      settings may differ; Dk, Dv and the launch settings of the first
      apply to all).
    lengths: int [B], tokens in the cache (the query's included).
    scores_width: W, columns of the emitted scores (one source only).
    scores_rows: Gs, a power of two dividing Gp: rows of the emitted scores
      (the first Gs of each group; ``scores_rows``); default Gp.

  Returns:
    (o [B, Hkv, splits, Gp, Dv_p] float32 normalised per split, lse
    [B, Hkv, splits, Gp] float32, -inf for an empty split, the splits of
    the sources in order; with ``scores_width`` also scores
    [B, Hkv, Gs, W] float32, columns of unused slots left unwritten).
  """
  b, hkv, group_p, dk_p = q4.shape
  dv_p = tc.next_pow2(sources[0][1].shape[3], tc.MIN_DOT_DIM)
  in_specs = [pl.BlockSpec((None, None, group_p, dk_p),
                           lambda i, g, s: (i, g, 0, 0))]
  args, start = [q4], 0
  for k, v, block_table, st in sources:
    size, n_s = v.shape[1], st.slots_per_split
    table = tc.pad_axis(block_table.astype(jnp.int32), 2,
                        st.num_splits * n_s, -1)
    args += [tc.pad_axis(k, 3, dk_p), tc.pad_axis(v, 3, dv_p),
             table.reshape(b, hkv, st.num_splits, n_s)]
    in_specs += [
        pl.BlockSpec((None, size, None, dk_p), lambda i, g, s: (i, 0, g, 0)),
        pl.BlockSpec((None, size, None, dv_p), lambda i, g, s: (i, 0, g, 0)),
        pl.BlockSpec((None, None, None, n_s),
                     lambda i, g, s, start=start, num=st.num_splits: (
                         i, g, jnp.clip(s - start, 0, num - 1), 0)),
    ]
    start += st.num_splits
  args.append(jnp.broadcast_to((lengths.astype(jnp.int32) - 1)[:, None],
                               (b, group_p)))
  in_specs.append(pl.BlockSpec((None, group_p), lambda i, g, s: (i, 0)))
  out_specs = [
      pl.BlockSpec((None, None, None, group_p, dv_p),
                   lambda i, g, s: (i, g, s, 0, 0)),
      pl.BlockSpec((None, None, None, group_p), lambda i, g, s: (i, g, s, 0)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((b, hkv, start, group_p, dv_p), jnp.float32),
      jax.ShapeDtypeStruct((b, hkv, start, group_p), jnp.float32),
  ]
  if scores_width is not None:  # every split writes its slots' columns
    rows = scores_rows or group_p
    out_specs.append(pl.BlockSpec((None, None, rows, scores_width),
                                  lambda i, g, s: (i, g, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, hkv, rows, scores_width),
                                          jnp.float32))
  sts = tuple(source[3] for source in sources)
  return pl.pallas_call(
      functools.partial(_decode_kernel, sts=sts),
      grid=(b, hkv, start),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=tc.compiler_params(sts[0].num_warps,
                                         sts[0].num_stages),
      interpret=sts[0].interpret,
      name="block_sparse_decode" if scores_width is None
      else "decode_with_scores",
  )(*args)


def merged(o, lse, num_heads: int, dv: int, dtype):
  """Merged partials -> (out [B, Hq, Dv] in dtype, lse [B, Hkv, Gp])."""
  out, lse = decode_merge.merge_reference(o, lse)
  b, hkv = out.shape[:2]
  group = num_heads // hkv
  out = out[:, :, :group, :dv].reshape(b, num_heads, dv).astype(dtype)
  return out, lse


@functools.partial(jax.jit, static_argnames=("sts",))
def _parts(q, arrays, lengths, sts: tuple[_Static, ...]):
  """arrays: (k, v, table) per source -> the launch's (o, lse) partials."""
  q4 = grouped_query(q, arrays[0][1].shape[2])
  return launch(q4, tuple((*a, st) for a, st in zip(arrays, sts)), lengths)


@functools.partial(jax.jit, static_argnames=("sts",))
def _decode(q, arrays, lengths, sts: tuple[_Static, ...]):
  """arrays: (k, v, table) per source -> ((out, lse) per source)."""
  b, hq, _ = q.shape
  hkv, dv = arrays[0][1].shape[2:]
  o, lse = _parts(q, arrays, lengths, sts)
  results, start = [], 0
  for st in sts:
    part = slice(start, start + st.num_splits)
    out, merged_lse = merged(o[:, :, part], lse[:, :, part], hq, dv, q.dtype)
    results.append((out, merged_lse[:, :, :hq // hkv].reshape(b, hq)))
    start += st.num_splits
  return tuple(results)


def settings(*, block_size: int, dk: int, num_slots: int, num_splits: int,
             scale: float | None, window: int | None = None,
             ring: bool = False, key_stride: int = 1, key_offset: int = 0,
             interpret: bool | None = None, num_warps: int = 4,
             num_stages: int = 2) -> _Static:
  """The kernel's static settings for ``num_slots`` table slots a row."""
  return _Static(block_size=block_size,
                 scale=dk ** -0.5 if scale is None else float(scale),
                 slots_per_split=tc.next_pow2(-(-num_slots // num_splits)),
                 num_splits=num_splits, window=window, ring=bool(ring),
                 key_stride=key_stride, key_offset=key_offset,
                 num_warps=num_warps,
                 num_stages=num_stages,
                 interpret=tc.resolve_interpret(interpret))


def default_num_splits(batch: int, num_kv_heads: int, num_slots: int) -> int:
  """Splits so that about 256 programs run and none walks over 32 slots.

  Measured on an H100 at 64k, batch 16, Hq 64 / Hkv 4 (kernel times from a
  profile): the compressed branch 78 us with 128 programs, 56 us with 256,
  57 us with 512; the selected branch 24 / 19 / 20 us. The whole NSA step
  110 / 113 / 121 us with 256 / 512 / 1024 programs. SeerAttention-R's 102
  slots (64k, batch 16, Hq 32 / Hkv 8): 251 us with 256 programs (64 slots
  each), 228 us with 512, 238 us with 1024.

  Returns:
    A power of two <= next_pow2(num_slots).
  """
  want = max(1, 256 // max(1, batch * num_kv_heads), -(-num_slots // 32))
  return min(tc.next_pow2(want), tc.next_pow2(num_slots))


class Source(NamedTuple):
  """One block-sparse read of ``block_sparse_decode_many``.

  k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv]; S a multiple of the block size.
  block_table: int [B, Hkv, n], entries in [0, S / block_size) or -1, no
  repeats. window: if set, keys also need ``s > t - window``. ring: k, v
  are a ring buffer of S slots: slot x holds position
  ``t - ((t - x) mod S)``; it must hold the newest S positions. num_splits:
  programs per (batch, kv head), a power of two (default
  ``default_num_splits``).
  """

  k: jax.Array
  v: jax.Array
  block_table: jax.Array
  window: int | None = None
  ring: bool = False
  num_splits: int | None = None


def _check_source(q, source: Source, lengths, block_size: int):
  """Raises ValueError for shapes or settings that do not fit."""
  k, v, block_table = source.k, source.v, source.block_table
  if q.ndim != 3 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"expected q [B, Hq, Dk], k/v [B, S, Hkv, D]; got "
                     f"{q.shape=}, {k.shape=}, {v.shape=}")
  b, hq, dk = q.shape
  _, size, hkv, _ = v.shape
  if k.shape[:3] != (b, size, hkv) or k.shape[3] != dk or hq % hkv:
    raise ValueError(f"{q.shape=}, {k.shape=} and {v.shape=} do not fit "
                     "(batch, cache length, GQA heads or Dk)")
  if block_size < tc.MIN_DOT_DIM or block_size & (block_size - 1):
    raise ValueError(f"{block_size=} must be a power of two >= "
                     f"{tc.MIN_DOT_DIM}")
  if size % block_size:
    raise ValueError(f"cache length {size} must be a multiple of "
                     f"{block_size=}")
  if block_table.ndim != 3 or block_table.shape[:2] != (b, hkv):
    raise ValueError(f"{block_table.shape=} must be [B, Hkv, n] for "
                     f"{q.shape=} and {k.shape=}")
  if not jnp.issubdtype(block_table.dtype, jnp.integer):
    raise ValueError(f"{block_table.dtype=} must be an integer type")
  if lengths.shape != (b,):
    raise ValueError(f"{lengths.shape=} must be [B] with B={b}")
  if source.window is not None and source.window < 1:
    raise ValueError(f"window={source.window} must be >= 1")
  num_splits = source.num_splits
  if num_splits is not None and (num_splits < 1
                                 or num_splits & (num_splits - 1)):
    raise ValueError(f"{num_splits=} must be a power of two >= 1")


def _source_settings(q, sources, lengths, block_size, **launch):
  """Checks the sources; their (k, v, table) arrays and settings."""
  if not sources:
    raise ValueError("no source to read")
  dims = {(x.k.shape[0], x.k.shape[2], x.k.shape[3], x.v.shape[3])
          for x in sources}
  if len(dims) > 1:
    raise ValueError(f"sources differ in (B, Hkv, Dk, Dv): {sorted(dims)}")
  sts = []
  for source in sources:
    _check_source(q, source, lengths, block_size)
    n = source.block_table.shape[-1]
    num_splits = source.num_splits or default_num_splits(
        q.shape[0], source.k.shape[2], n)
    sts.append(settings(block_size=block_size, dk=q.shape[2], num_slots=n,
                        num_splits=num_splits, window=source.window,
                        ring=source.ring, **launch))
  return tuple((x.k, x.v, x.block_table) for x in sources), tuple(sts)


def block_sparse_decode_many(q, sources, lengths, *, block_size: int,
                             scale: float | None = None,
                             interpret: bool | None = None,
                             num_warps: int = 4, num_stages: int = 2):
  """``block_sparse_decode`` over several sources in one launch.

  The same queries read each ``Source`` separately (NSA's selected blocks
  of the cache and its window ring): one kernel launch whose grid holds the
  splits of every source, one merge per source.

  Args:
    q: [B, Hq, Dk].
    sources: ``Source`` tuples (same B, Hkv, Dk and Dv).
    lengths: int [B] in [1, S], tokens in the cache, the query's included.
    block_size: a power of two >= 16.
    scale: default 1/sqrt(Dk).
    interpret: Pallas interpret mode; None: when no GPU is present.
    num_warps, num_stages: Triton launch settings.

  Returns:
    One (out [B, Hq, Dv] in q.dtype, lse [B, Hq] float32) per source; a
    row that sees no key gets out = 0, lse = -inf.

  Raises:
    ValueError: shapes or settings that do not fit.
  """
  arrays, sts = _source_settings(
      q, sources, lengths, block_size, scale=scale, interpret=interpret,
      num_warps=num_warps, num_stages=num_stages)
  return _decode(q, arrays, lengths, sts)


def block_sparse_decode_parts(q, sources, lengths, *, block_size: int,
                              scale: float | None = None,
                              interpret: bool | None = None,
                              num_warps: int = 4, num_stages: int = 2):
  """``block_sparse_decode_many``'s launch, its splits left unmerged.

  For a caller that merges them itself (``decode_merge.gated_merge``).
  Args and Raises as ``block_sparse_decode_many``.

  Returns:
    (o float32 [B, Hkv, S, Gp, Dv_p] normalised per split, lse float32
    [B, Hkv, S, Gp] (-inf: empty split), splits: the number of splits of
    each source, in order, summing to S; G padded to Gp, Dv to Dv_p as in
    ``launch``).
  """
  arrays, sts = _source_settings(
      q, sources, lengths, block_size, scale=scale, interpret=interpret,
      num_warps=num_warps, num_stages=num_stages)
  o, lse = _parts(q, arrays, lengths, sts)
  return o, lse, tuple(st.num_splits for st in sts)


def block_sparse_decode(q, k, v, block_table, lengths, *, block_size: int,
                        scale: float | None = None,
                        window: int | None = None, ring: bool = False,
                        num_splits: int | None = None,
                        interpret: bool | None = None, num_warps: int = 4,
                        num_stages: int = 2):
  """One query per row over the key blocks of any block table.

  The query of row b sits at position ``t = lengths[b] - 1`` and, for kv head
  g, attends to the keys ``s <= t`` of the blocks ``block_table[b, g]``
  (block j = keys ``[j*block_size, (j+1)*block_size)``, -1 empty, no
  repeats). The grid is (batch, kv head, split): each program loads the
  whole GQA group as one ``[Gp, Dk]`` tile (G padded to >= 16), walks its
  split of the table's slots with an online softmax and writes a partial
  output and log-sum-exp; the splits are merged by their log-sum-exp
  (flash-decoding), so even batch 1 fills the GPU. Keys past a row's length
  never enter: garbage there (NaN, inf) contributes nothing.

  Args:
    q: [B, Hq, Dk].
    k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv]; S a multiple of ``block_size``.
    block_table: int [B, Hkv, n], entries in [0, S / block_size) or -1.
    lengths: int [B] in [1, S], tokens in the cache, the query's included.
    block_size: a power of two >= 16.
    scale: default 1/sqrt(Dk).
    window: if set, keys also need ``s > t - window`` (NSA's window branch).
    ring: k, v are a ring buffer of S slots (NSA's window K/V): slot x
      holds position ``t - ((t - x) mod S)``, which the masks use; it must
      hold the newest S positions, so ``S >= window``.
    num_splits: programs per (batch, kv head), a power of two; default
      ``default_num_splits``.
    interpret: Pallas interpret mode; None: when no GPU is present.
    num_warps, num_stages: Triton launch settings.

  Returns:
    (out [B, Hq, Dv] in q.dtype, lse [B, Hq] float32); a row that sees no
    key gets out = 0, lse = -inf.

  Raises:
    ValueError: shapes or settings that do not fit.
  """
  return block_sparse_decode_many(
      q, [Source(k, v, block_table, window, ring, num_splits)], lengths,
      block_size=block_size, scale=scale, interpret=interpret,
      num_warps=num_warps, num_stages=num_stages)[0]


def _token_block(num_tokens: int) -> int:
  """Keys per step of the compressed branch: 64, or the largest power of
  two >= 16 that divides ``num_tokens``; 64 when none does (then padded)."""
  for size in (64, 32, tc.MIN_DOT_DIM):
    if num_tokens % size == 0:
      return size
  return 64


def compressed_columns(num_tokens: int) -> int:
  """Score columns ``compressed_decode`` may write for Tc tokens: Tc,
  rounded up to a whole step of 64 when it is padded."""
  return tc.round_up(num_tokens, _token_block(num_tokens))


def compressed_decode(q, k_cmp, v_cmp, lengths, **kwargs):
  """NSA's compressed branch for one query a row, merged, with its scores.

  ``compressed_decode_parts`` with the splits merged by their log-sum-exp
  (in XLA). Args as ``compressed_decode_parts``.

  Returns:
    (out [B, Hq, Dv] in q.dtype, lse [B, Hkv, Gp] float32 (-inf for padded
    heads and rows that see no token), scores as
    ``compressed_decode_parts``'s).
  """
  o, lse, scores = compressed_decode_parts(q, k_cmp, v_cmp, lengths,
                                           **kwargs)
  return (*merged(o, lse, q.shape[1], v_cmp.shape[3], q.dtype), scores)


def compressed_decode_parts(q, k_cmp, v_cmp, lengths, *, cmp_block: int,
                            cmp_stride: int, scores_width: int,
                            scale: float | None = None,
                            num_splits: int | None = None,
                            interpret: bool | None = None,
                            num_warps: int = 4, num_stages: int = 2):
  """NSA's compressed branch for one query a row, its splits unmerged.

  The query of row b at ``t = lengths[b] - 1`` sees compressed token i iff
  ``i * cmp_stride + cmp_block - 1 <= t``. The same kernel as
  ``block_sparse_decode`` walks the visible tokens in blocks of 64 (a
  table of consecutive blocks, split across programs) and also writes each
  visible token's ``scale * q.k * log2(e)`` (-inf when masked) to column
  i of ``scores``: the selection kernel
  (``decode_select.nsa_decode_select``) turns them into block scores with
  the merged log-sum-exp. A cache whose Tc is not a multiple of 16 is
  padded (a copy); ``NSACache`` allocates whole blocks of 64. The splits
  are left for the caller to merge (``decode_merge.gated_merge``, or
  ``compressed_decode``).

  Args:
    q: [B, Hq, Dk].
    k_cmp: [B, Tc, Hkv, Dk]; v_cmp: [B, Tc, Hkv, Dv], Tc >= 1.
    lengths: int [B] in [1, ...], tokens in the cache (the query's
      included).
    cmp_block, cmp_stride: l and d.
    scores_width: W >= Tc, columns of the emitted scores.
    scale: default 1/sqrt(Dk).
    num_splits: programs per (batch, kv head); default
      ``default_num_splits``.
    interpret: Pallas interpret mode; None: when no GPU is present.
    num_warps, num_stages: Triton launch settings.

  Returns:
    (o float32 [B, Hkv, S, Gp, Dv_p] normalised per split, lse float32
    [B, Hkv, S, Gp] (-inf: empty split), scores [B, Hkv, Gs, W] float32
    (Gs: ``scores_rows``, G rounded up to a power of two; the columns of
    invisible blocks left unwritten)).
  """
  b, _, dk = q.shape
  tc_len, hkv = k_cmp.shape[1], k_cmp.shape[2]
  block = _token_block(tc_len)
  padded = compressed_columns(tc_len)
  if scores_width < padded:
    raise ValueError(f"{scores_width=} < Tc={tc_len} (in steps of {block})")
  k_cmp, v_cmp = (tc.pad_axis(x, 1, padded) for x in (k_cmp, v_cmp))
  num_blocks = padded // block
  # Blocks holding a visible token; the later ones are -1 and never walked.
  t = lengths.astype(jnp.int32) - 1
  visible = jnp.clip((t - cmp_block + 1) // cmp_stride + 1, 0, tc_len)
  used = -(-visible // block)  # [B]
  blocks = jnp.arange(num_blocks, dtype=jnp.int32)
  table = jnp.where(blocks[None, :] < used[:, None], blocks[None, :], -1)
  table = jnp.broadcast_to(table[:, None], (b, hkv, num_blocks))
  if num_splits is None:
    num_splits = default_num_splits(b, hkv, num_blocks)
  st = settings(block_size=block, dk=dk, num_slots=num_blocks,
                num_splits=num_splits, scale=scale, key_stride=cmp_stride,
                key_offset=cmp_block - 1,
                interpret=interpret, num_warps=num_warps,
                num_stages=num_stages)
  return _compressed(q, k_cmp, v_cmp, table, lengths, st, scores_width)


@functools.partial(jax.jit, static_argnames=("st", "scores_width"))
def _compressed(q, k, v, table, lengths, st: _Static, scores_width: int):
  hkv = v.shape[2]
  return launch(grouped_query(q, hkv), ((k, v, table, st),), lengths,
                scores_width, scores_rows(q.shape[1], hkv))


def block_sparse_decode_reference(q, k, v, block_table, lengths, *,
                                  block_size: int, scale: float | None = None,
                                  window: int | None = None,
                                  ring: bool = False):
  """Dense masked float32 oracle of ``block_sparse_decode``.

  Slot x (position x, or ``t - ((t - x) mod S)`` for a ring) is seen by the
  query of (b, g) at ``t = lengths[b] - 1`` iff ``x // block_size`` is in
  ``block_table[b, g]`` and ``0 <= position <= t`` (and ``> t - window``).

  Returns:
    (out [B, Hq, Dv] in q.dtype, lse [B, Hq] float32).
  """
  b, hq, dk = q.shape
  size, hkv = k.shape[1], k.shape[2]
  group = hq // hkv
  s = jnp.arange(size)
  in_table = (block_table[..., None] == (s // block_size)).any(axis=-2)
  t = (lengths - 1)[:, None, None]
  pos = t - jnp.mod(t - s, size) if ring else s  # [B, 1, S]
  mask = in_table & (pos >= 0) & (pos <= t)  # [B, Hkv, S]
  if window is not None:
    mask &= pos > t - window
  mask = jnp.repeat(mask, group, axis=1)  # [B, Hq, S]
  kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)
  vf = jnp.repeat(v.astype(jnp.float32), group, axis=2)
  vf = jnp.where(mask.transpose(0, 2, 1)[..., None], vf, 0.0)
  scores = jnp.einsum("bhd,bshd->bhs", q.astype(jnp.float32), kf)
  scores = jnp.where(mask, scores * (dk ** -0.5 if scale is None else scale),
                     -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m)
  denom = p.sum(-1)
  seen = denom > 0
  out = jnp.einsum("bhs,bshd->bhd", p, vf) / jnp.where(seen, denom, 1.0)[
      ..., None]
  lse = jnp.where(seen, m[..., 0] + jnp.log(jnp.where(seen, denom, 1.0)),
                  -jnp.inf)
  return out.astype(q.dtype), lse
