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
  back: int  # earlier blocks whose tokens also cover a block
  chunk: int  # C, blocks scored per program


def _rank(scores, t, rule: _Rule):
  """int32 [n_p] top-n of one row of block scores [Ts_p] for position t."""
  j = jnp.arange(scores.shape[0])
  own = lax.div(t, rule.block_size)
  causal = (j <= own) & (j < rule.num_blocks)
  forced = causal & ((j < rule.num_initial) | (j > own - rule.num_local))
  ranked = jnp.where(forced, jnp.inf, jnp.where(causal, scores, -jnp.inf))
  n_p = tc.next_pow2(rule.num_selected)
  return top_n_rounds(ranked[None, :], rule.num_selected, n_p,
                      floor=-jnp.inf, taken=-jnp.inf)[0]


def _top_n_kernel(scores_ref, t_ref, out_ref, *, rule: _Rule):
  """Refs: scores [Ts_p], t [16] (the position, repeated) -> out [n_p]."""
  out_ref[...] = _rank(scores_ref[...], jnp.max(t_ref[...]), rule)


def _scores_kernel(s_ref, lse_ref, t_ref, out_ref, *, sc: _Scores):
  """Eq. 9 scores of one chunk of blocks of one (row, kv head).

  Refs: s [Gp, R, a] float32 (row r holds tokens ``(r - back) * a + m``,
  ``scale * q.k * log2(e)``), lse [Gp] float32 (natural log; -inf for a
  head that sees nothing; rows past G are padding), t [16] -> out [C]
  float32, blocks ``[c * C, (c + 1) * C)`` of chunk c = program 2.

  Block j's score sums, over the group's heads, ``coverage(i - j*a) * p_i``
  for the tokens i of blocks j - back .. j: one [Gp, C, a] load per earlier
  block, so no register shifts are needed.
  """
  t = jnp.max(t_ref[...])
  size, a = out_ref.shape[0], s_ref.shape[2]
  first = pl.program_id(2) * size
  j = first + jnp.arange(size)[None, :, None]
  m = jnp.arange(a)[None, None, :]
  lse2 = (lse_ref[...] * tc.LOG2E)[:, None, None]  # [Gp, 1, 1]
  real = (jnp.arange(lse2.shape[0]) < sc.group)[:, None, None]
  acc = jnp.zeros((size,), jnp.float32)
  for k in range(sc.back + 1):
    s = s_ref[:, pl.ds(first + sc.back - k, size), :]  # [Gp, C, a]
    i = (j - k) * a + m
    seen = (i >= 0) & (i * sc.cmp_stride + sc.cmp_block - 1 <= t)
    seen &= real & (lse2 > -jnp.inf)
    p = jnp.where(seen, jnp.exp2(s - lse2), 0.0)
    w = coverage(m - k * a, 0, sc.cmp_block, sc.cmp_stride, sc.sel_block)
    acc += jnp.sum(jnp.sum(p * w, axis=2), axis=0)
  out_ref[...] = acc


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


def scores_layout(cmp_block: int, cmp_stride: int, sel_block: int,
                  num_blocks: int, num_tokens: int) -> tuple[int, int]:
  """(width W, front) of the compressed scores ``nsa_decode_select`` reads.

  Token i sits at column ``i + front``; ``front`` leaves room for the
  earlier blocks' rows, W covers ``max(Tc, next_pow2(Ts) * a)`` tokens.
  """
  a = sel_block // cmp_stride
  back = -(-(cmp_block // cmp_stride - 1) // a)
  front = back * a
  tokens = max(num_tokens, tc.next_pow2(num_blocks) * a)
  return front + tc.round_up(tokens, a), front


def _chunk(group_p: int, ratio: int, ts_p: int) -> int:
  """Blocks scored per program: [Gp, C, a] tiles of about 2048 floats."""
  return min(ts_p, max(1, 2048 // (group_p * ratio)))


def nsa_decode_select(scores, lse, lengths, *, cmp_block: int,
                      cmp_stride: int, sel_block: int, num_blocks: int,
                      num_heads: int, num_selected: int, num_initial: int,
                      num_local: int, interpret: bool | None = None):
  """NSA's top-n blocks of each row's query from its compressed scores.

  Two kernels: Eq. 9 block scores of chunks of blocks, the whole group at
  once (grid (B, Hkv, chunks), so even batch 1 fills the GPU), then
  ``decode_top_n``'s ranking with NSA's forced blocks.

  Args:
    scores: float32 [B, Hkv, Gp, W] from ``compressed_decode`` with
      ``scores_layout``'s width and front.
    lse: float32 [B, Hkv, Gp], the compressed branch's merged log-sum-exp.
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
  b, hkv, group_p, width = scores.shape
  a = sel_block // cmp_stride
  want, front = scores_layout(cmp_block, cmp_stride, sel_block, num_blocks,
                              0)
  if width < want or width % a:
    raise ValueError(f"{scores.shape=}: width must be a multiple of {a} and "
                     f">= {want} (scores_layout)")
  ts_p = tc.next_pow2(num_blocks)
  sc = _Scores(cmp_block=cmp_block, cmp_stride=cmp_stride,
               sel_block=sel_block, group=num_heads // hkv, back=front // a,
               chunk=_chunk(group_p, a, ts_p))
  interpret = tc.resolve_interpret(interpret)
  block_scores = _block_scores(scores.reshape(b, hkv, group_p, width // a, a),
                               lse, _positions(lengths, b), sc, ts_p,
                               interpret)
  # Columns past Ts are never causal (t < S): no slice needed.
  return decode_top_n(block_scores, lengths,
                      block_size=sel_block, num_selected=num_selected,
                      num_initial=num_initial, num_local=num_local,
                      interpret=interpret)


@functools.partial(jax.jit, static_argnames=("sc", "ts_p", "interpret"))
def _block_scores(scores, lse, t, sc: _Scores, ts_p: int, interpret: bool):
  """[B, Hkv, Gp, R, a] scores -> float32 [B, Hkv, Ts_p] block scores."""
  b, hkv, group_p, rows, a = scores.shape
  return pl.pallas_call(
      functools.partial(_scores_kernel, sc=sc),
      grid=(b, hkv, ts_p // sc.chunk),
      in_specs=[
          pl.BlockSpec((None, None, group_p, rows, a),
                       lambda i, g, c: (i, g, 0, 0, 0)),
          pl.BlockSpec((None, None, group_p), lambda i, g, c: (i, g, 0)),
          pl.BlockSpec((None, tc.MIN_DOT_DIM), lambda i, g, c: (i, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, sc.chunk),
                             lambda i, g, c: (i, g, c)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, ts_p), jnp.float32),
      compiler_params=tc.compiler_params(4, 2),
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
  return _top_n(padded, _positions(lengths, b), rule)[..., :num_selected]


@functools.partial(jax.jit, static_argnames=("rule",))
def _top_n(scores, t, rule: _Rule):
  b, hkv, width = scores.shape
  n_p = tc.next_pow2(rule.num_selected)
  return pl.pallas_call(
      functools.partial(_top_n_kernel, rule=rule),
      grid=(b, hkv),
      in_specs=[
          pl.BlockSpec((None, None, width), lambda i, g: (i, g, 0)),
          pl.BlockSpec((None, tc.MIN_DOT_DIM), lambda i, g: (i, 0)),
      ],
      out_specs=pl.BlockSpec((None, None, n_p), lambda i, g: (i, g, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, n_p), jnp.int32),
      compiler_params=tc.compiler_params(rule.num_warps, 1),
      interpret=rule.interpret,
      name="decode_top_n",
  )(scores, t)
