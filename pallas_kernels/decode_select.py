"""Block selection of a decode step on the GPU (Pallas Triton), no top_k.

XLA's ``top_k`` over a decode step's ``[B * Hkv, Ts]`` rows took 38 us at
batch 1 and 62 us at batch 16 on an H100 (64k context), more than the
whole attention read. Here one program per (row, kv head) holds its row of
block scores in registers and ranks it by n rounds of argmax
(``block_select.top_n_rounds``), with the rule of
``nsa_jax.selection.forced_top_n``: forced blocks first, then the causal
blocks by score (ties to the lower index), never a block scored -inf
unless forced, -1 in spare slots.

Two entry points:

* ``nsa_decode_select``: NSA's selection from the compressed branch's
  scores (``decode_attention.compressed_decode``): Eq. 9 block scores from
  ``p = exp(s - lse)`` summed over the GQA group, then top-n.
* ``decode_top_n``: the same ranking over block scores a caller computed
  (SeerAttention-R's gate probabilities).

Measured on the H100 (64k, Hq 64 / Hkv 4, from a profile): block scores 1.6
/ 6.6 us and top-n 5.5 / 5.6 us at batch 1 / 16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import triton_compat as tc
from pallas_kernels.block_scores import check_block_sizes
from pallas_kernels.block_scores import coverage
from pallas_kernels.block_select import forced_ranking
from pallas_kernels.block_select import top_n_rounds


@dataclasses.dataclass(frozen=True)
class _Rule:
  """Hashable selection settings of one call."""

  block_size: int  # l', keys per selection block
  num_blocks: int  # Ts, blocks of the cache
  num_selected: int
  num_initial: int
  num_local: int
  num_warps: int
  interpret: bool


@dataclasses.dataclass(frozen=True)
class _Scores:
  """Hashable Eq. 9 settings of ``nsa_decode_select``."""

  cmp_block: int  # l
  cmp_stride: int  # d
  sel_block: int  # l'
  group: int  # G, real heads among the Gp rows
  chunk: int  # C, blocks scored per program


def _rank(scores, t, rule: _Rule):
  """int32 [n_p] top-n of one row of block scores [Ts_p] for position t."""
  ranked = forced_ranking(scores[None, :], lax.div(t, rule.block_size), None,
                          num_blocks=rule.num_blocks,
                          num_initial=rule.num_initial,
                          num_local=rule.num_local, floor=-jnp.inf)
  n_p = tc.next_pow2(rule.num_selected)
  return top_n_rounds(ranked, rule.num_selected, n_p, floor=-jnp.inf,
                      taken=-jnp.inf)[0]


def _top_n_kernel(parts_ref, t_ref, out_ref, *, rule: _Rule):
  """Ranks the sum of a row's score parts, part k shifted by k blocks.

  Refs: parts [P, back + Ts_p] float32 (part k's score of block j at
  column ``back + j``; the first ``back`` columns are never read as
  blocks >= 0), t [16] (the position, repeated) -> out [n_p] int32.
  Block j scores ``sum_k part_k[j - k]`` (0 for j < k).
  """
  num_parts, width = parts_ref.shape
  back = num_parts - 1
  size = width - back
  j = jnp.arange(size)
  scores = parts_ref[0, pl.ds(back, size)]
  for k in range(1, num_parts):
    scores += jnp.where(j >= k, parts_ref[k, pl.ds(back - k, size)], 0.0)
  out_ref[...] = _rank(scores, jnp.max(t_ref[...]), rule)


def _scores_kernel(s_ref, lse_ref, t_ref, out_ref, *, sc: _Scores):
  """Eq. 9 score parts of one chunk of blocks of one (row, kv head).

  Refs: s [Gs, R, a] float32 (row j holds tokens ``j * a + m``,
  ``scale * q.k * log2(e)``), lse [S, Gs] float32 (natural log, the S
  splits of the compressed branch, merged here; -inf for an empty split;
  rows past G are padding), t [16] -> out
  [back + 1, back + Ts_p] float32 (``_top_n_kernel``'s parts), columns
  ``back + [c * C, (c + 1) * C)`` for chunk c = program 2.

  The tokens of block j (``j * a + m``) count in block j + k with weight
  ``coverage(m - k * a)``: part k sums those over the group's heads. One
  [Gs, C, a] load and one exp per token; the top-n kernel adds the parts
  shifted, so no register shifts are needed here.
  """
  t = jnp.max(t_ref[...])
  size, a = sc.chunk, s_ref.shape[2]
  first = pl.program_id(2) * size
  j = first + jnp.arange(size)[None, :, None]
  m = jnp.arange(a)[None, None, :]
  lse2 = (_merged_lse(lse_ref[...]) * tc.LOG2E)[:, None, None]  # [Gs, 1, 1]
  real = (jnp.arange(lse2.shape[0]) < sc.group)[:, None, None]
  s = s_ref[:, pl.ds(first, size), :]  # [Gs, C, a]
  i = j * a + m
  seen = (i * sc.cmp_stride + sc.cmp_block - 1 <= t) & real
  seen &= lse2 > -jnp.inf
  p = jnp.where(seen, jnp.exp2(s - lse2), 0.0)
  p = jnp.sum(p, axis=0)  # [C, a], the group summed
  back = out_ref.shape[0] - 1
  for k in range(back + 1):
    w = coverage(m[0] - k * a, 0, sc.cmp_block, sc.cmp_stride, sc.sel_block)
    out_ref[k, pl.ds(back + first, size)] = jnp.sum(p * w, axis=1)


def _merged_lse(lse):
  """float32 [S, G] split log-sum-exps -> [G] (-inf: every split empty)."""
  m = jnp.max(lse, axis=0)
  m = jnp.where(m == -jnp.inf, 0.0, m)
  total = jnp.sum(jnp.where(lse > -jnp.inf, jnp.exp(lse - m[None, :]), 0.0),
                  axis=0)
  return jnp.where(total > 0.0, m + jnp.log(jnp.where(total > 0.0, total,
                                                      1.0)), -jnp.inf)


def _warps(num_floats: int) -> int:
  """Warps ranking a row of ``num_floats``: one up to 2048 (reductions in
  shuffles, no shared memory), then doubling per 2048, at most 8."""
  return min(8, tc.next_pow2(-(-num_floats // 2048)))


def _positions(lengths, batch: int):
  """int32 [B, 16]: each row's query position ``lengths - 1``, repeated."""
  t = lengths.astype(jnp.int32) - 1
  return jnp.broadcast_to(t[:, None], (batch, tc.MIN_DOT_DIM))


def _check_rule(num_selected: int, num_initial: int, num_local: int,
                block_size: int):
  if num_selected < 1 or num_initial < 0 or num_local < 0 or block_size < 1:
    raise ValueError(f"{num_selected=} must be >= 1, {num_initial=} and "
                     f"{num_local=} >= 0, {block_size=} >= 1")


def scores_width(cmp_stride: int, sel_block: int, num_blocks: int,
                 num_tokens: int) -> int:
  """Columns W of the compressed scores ``nsa_decode_select`` reads.

  Token i sits at column i; W covers ``max(Tc, next_pow2(Ts) * a)`` tokens
  (``num_tokens`` = Tc), a multiple of ``a = sel_block / cmp_stride``.
  """
  a = sel_block // cmp_stride
  return tc.round_up(max(num_tokens, tc.next_pow2(num_blocks) * a), a)


def _chunk(group_s: int, ratio: int, ts_p: int) -> int:
  """Blocks scored per program: [Gs, C, a] tiles of about 2048 floats."""
  return min(ts_p, max(1, 2048 // (group_s * ratio)))


def nsa_decode_select(scores, lse, lengths, *, cmp_block: int,
                      cmp_stride: int, sel_block: int, num_blocks: int,
                      num_heads: int, num_selected: int, num_initial: int,
                      num_local: int, interpret: bool | None = None):
  """NSA's top-n blocks of each row's query from its compressed scores.

  Two kernels: Eq. 9 score parts of chunks of blocks, the whole group at
  once (grid (B, Hkv, chunks), so even batch 1 fills the GPU), then the
  ranking of their shifted sum with NSA's forced blocks.

  Args:
    scores: float32 [B, Hkv, Gs, W] from ``compressed_decode`` (Gs: its
      ``scores_rows``, a power of two >= G), W
      ``scores_width``'s.
    lse: float32 [B, Hkv, Gp], the compressed branch's merged log-sum-exp,
      or [B, Hkv, S, Gp], its S splits' (merged in the kernel, so the
      branch's partials need no merge before the selection); Gp a multiple
      of Gs (its first Gs heads are read).
    lengths: int [B], tokens in the cache (the query at ``lengths - 1``).
    cmp_block, cmp_stride, sel_block: l, d, l'.
    num_blocks: Ts, selection blocks of the cache.
    num_heads: Hq (the real heads among Gp per kv head: Hq / Hkv).
    num_selected, num_initial, num_local: the top-n rule.
    interpret: Pallas interpret mode; None: when no GPU is present.

  Returns:
    int32 [B, Hkv, num_selected], as ``nsa_jax.selection.top_n_at``.
  """
  check_block_sizes(cmp_block, cmp_stride, sel_block)
  _check_rule(num_selected, num_initial, num_local, sel_block)
  b, hkv, group_s, width = scores.shape
  a = sel_block // cmp_stride
  want = scores_width(cmp_stride, sel_block, num_blocks, 0)
  if width < want or width % a:
    raise ValueError(f"{scores.shape=}: width must be a multiple of {a} and "
                     f">= {want} (scores_width)")
  ts_p = tc.next_pow2(num_blocks)
  sc = _Scores(cmp_block=cmp_block, cmp_stride=cmp_stride,
               sel_block=sel_block, group=num_heads // hkv,
               chunk=_chunk(group_s, a, ts_p))
  # Tokens of block j also count in blocks j + 1 .. j + back.
  back = -(-(cmp_block // cmp_stride - 1) // a)
  if lse.ndim == 3:
    lse = lse[:, :, None]
  if (lse.ndim != 4 or lse.shape[:2] != (b, hkv) or lse.shape[3] % group_s
      or num_heads // hkv > group_s):
    raise ValueError(f"{lse.shape=} must be [B, Hkv, (S,) Gp], Gp a "
                     f"multiple of the {group_s} rows of {scores.shape=}, "
                     f"which must cover G = {num_heads // hkv}")
  interpret = tc.resolve_interpret(interpret)
  t = _positions(lengths, b)
  parts = _score_parts(scores.reshape(b, hkv, group_s, width // a, a), lse,
                       t, sc, back, ts_p, interpret)
  rule = _Rule(block_size=sel_block, num_blocks=num_blocks,
               num_selected=num_selected, num_initial=num_initial,
               num_local=num_local, num_warps=_warps(ts_p),
               interpret=interpret)
  return _top_n(parts, t, rule)[..., :num_selected]


@functools.partial(jax.jit,
                   static_argnames=("sc", "back", "ts_p", "interpret"))
def _score_parts(scores, lse, t, sc: _Scores, back: int, ts_p: int,
                 interpret: bool):
  """[B, Hkv, Gp, R, a] scores -> [B, Hkv, back + 1, back + Ts_p] parts."""
  b, hkv, group_s, rows, a = scores.shape
  shape = (b, hkv, back + 1, back + ts_p)
  return pl.pallas_call(
      functools.partial(_scores_kernel, sc=sc),
      grid=(b, hkv, ts_p // sc.chunk),
      in_specs=[
          pl.BlockSpec((None, None, group_s, rows, a),
                       lambda i, g, c: (i, g, 0, 0, 0)),
          pl.BlockSpec((None, None, lse.shape[2], group_s),
                       lambda i, g, c: (i, g, 0, 0)),
          pl.BlockSpec((None, tc.MIN_DOT_DIM), lambda i, g, c: (i, 0)),
      ],
      # Every chunk writes its columns of the whole row's parts.
      out_specs=pl.BlockSpec((None, None) + shape[2:],
                             lambda i, g, c: (i, g, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(shape, jnp.float32),
      compiler_params=tc.compiler_params(4, 1),
      interpret=interpret,
      name="nsa_decode_block_scores",
  )(scores, lse, t)


def decode_top_n(scores, lengths, *, block_size: int, num_selected: int,
                 num_initial: int, num_local: int,
                 interpret: bool | None = None):
  """``nsa_jax.selection.forced_top_n`` of one query a row, as a kernel.

  Args:
    scores: float [B, Hkv, N] block scores (-inf: never chosen unless
      forced).
    lengths: int [B], tokens in the cache (the query at ``lengths - 1``).
    block_size: keys per block.
    num_selected, num_initial, num_local: the top-n rule.
    interpret: Pallas interpret mode; None: when no GPU is present.

  Returns:
    int32 [B, Hkv, num_selected].
  """
  _check_rule(num_selected, num_initial, num_local, block_size)
  if scores.ndim != 3 or lengths.shape != scores.shape[:1]:
    raise ValueError(f"{scores.shape=} must be [B, Hkv, N] and "
                     f"{lengths.shape=} [B]")
  b, hkv, num_blocks = scores.shape
  n_p = tc.next_pow2(num_blocks)
  rule = _Rule(block_size=block_size, num_blocks=num_blocks,
               num_selected=num_selected, num_initial=num_initial,
               num_local=num_local, num_warps=_warps(n_p),
               interpret=tc.resolve_interpret(interpret))
  padded = tc.pad_axis(scores.astype(jnp.float32), 2, n_p, -jnp.inf)
  return _top_n(padded[:, :, None], _positions(lengths, b),
                rule)[..., :num_selected]


@functools.partial(jax.jit, static_argnames=("rule",))
def _top_n(parts, t, rule: _Rule):
  """[B, Hkv, P, back + N_p] score parts -> int32 [B, Hkv, n_p]."""
  b, hkv = parts.shape[:2]
  n_p = tc.next_pow2(rule.num_selected)
  return pl.pallas_call(
      functools.partial(_top_n_kernel, rule=rule),
      grid=(b, hkv),
      in_specs=[
          pl.BlockSpec((None, None) + parts.shape[2:],
                       lambda i, g: (i, g, 0, 0)),
          pl.BlockSpec((None, tc.MIN_DOT_DIM), lambda i, g: (i, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, n_p), lambda i, g: (i, g, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, n_p), jnp.int32),
      compiler_params=tc.compiler_params(rule.num_warps, 1),
      interpret=rule.interpret,
      name="decode_top_n",
  )(parts, t)
