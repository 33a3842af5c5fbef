"""NSA block selection on the GPU: block scores, then top-n (Pallas Triton).

No ``jax.lax.top_k``: XLA's top-k over ``[T * Hkv, Ts]`` rows costs as much as
a dense attention at 16k (PALLAS_TRITON.md). Here the block-score kernel
(``block_scores.py``) writes float32 scores of every causal block, and a
second kernel ranks each row in registers by ``n`` rounds of argmax-and-mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import group_tiles
from pallas_kernels import triton_compat as tc
from pallas_kernels.block_scores import check_block_sizes
from pallas_kernels.block_scores import check_inputs
from pallas_kernels.block_scores import default_launch
from pallas_kernels.block_scores import padded_scores
from pallas_kernels.block_scores import ScoreLaunch

# Ranking values (forced blocks rank +inf, ``forced_ranking``): non-causal
# blocks below every score (scores are sums of probabilities, >= 0), and a
# block already taken below those.
_NOT_CAUSAL = -1.0
_TAKEN = -2.0
# Bytes of float32 scores held at once; longer sequences are ranked in
# slices of query positions (each slice: one score and one top-n launch).
_SCORE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class _TopN:
  sel_block: int  # l'
  num_selected: int  # n
  num_initial: int
  num_local: int
  num_blocks: int  # Ts
  q_offset: int
  rows: int  # positions per program
  interpret: bool
  documents: bool  # document starts are an input (group_tiles.split_starts)


def _top_n_kernel(scores_ref, *refs, st: _TopN):
  """Ranks one tile of rows: forced blocks, then scores, ties to lower j.

  Refs: scores [rows, Ts_p] float32, (starts [rows]) -> out [rows, n_p]
  int32 (-1: empty). The candidates of a row are the blocks f .. own, f the
  block of its document's start (0 without documents); forced: f ..
  f + num_initial - 1 and the num_local ending at own. Each of the n rounds
  takes the row's argmax (the lowering breaks ties to the lower index, as
  the spec does) and marks that block taken.
  """
  starts_ref, (out_ref,) = group_tiles.split_starts(refs, st.documents)
  rows = scores_ref.shape[0]
  n_p = out_ref.shape[-1]
  t = st.q_offset + pl.program_id(1) * rows + jnp.arange(rows)
  own = lax.div(t, st.sel_block)[:, None]  # [rows, 1]
  first = (None if starts_ref is None else
           lax.div(starts_ref[...], st.sel_block)[:, None])  # [rows, 1]
  ranked = forced_ranking(scores_ref[...], own, first,
                          num_blocks=st.num_blocks,
                          num_initial=st.num_initial,
                          num_local=st.num_local, floor=_NOT_CAUSAL)
  out_ref[...] = top_n_rounds(ranked, st.num_selected, n_p,
                              floor=_NOT_CAUSAL, taken=_TAKEN)


def forced_ranking(scores, own, first, *, num_blocks: int, num_initial: int,
                   num_local: int, floor: float):
  """Ranking values of the top-n rule (``selection.forced_top_n``).

  Args:
    scores: float32 [rows, N] block scores.
    own: int [rows, 1] (or scalar): each row's own block ``t // l'``.
    first: int [rows, 1]: the block of the row's document start, or None
      (block 0).
    num_blocks, num_initial, num_local: the rule.
    floor: the value of blocks that are no candidates.

  Returns:
    float32 [rows, N]: +inf for forced blocks (f .. f + num_initial - 1 and
    the num_local ending at own), the score for the other candidates
    (f .. own, below num_blocks), ``floor`` elsewhere.
  """
  j = jnp.arange(scores.shape[-1])[None, :]
  causal = (j <= own) & (j < num_blocks)
  if first is None:
    first = 0
  else:
    causal &= j >= first
  forced = causal & ((j < first + num_initial) | (j > own - num_local))
  return jnp.where(forced, jnp.inf, jnp.where(causal, scores, floor))


def top_n_rounds(ranked, num_selected: int, n_p: int, *, floor: float,
                 taken: float):
  """Indices of each row's ``num_selected`` largest entries, in order.

  Each round takes the row's argmax (the Triton lowering breaks ties to the
  lower index, as the spec does) and marks that entry ``taken``; a round
  whose maximum is not above ``floor`` yields -1. ``taken <= floor``.

  Args:
    ranked: float32 [rows, N] ranking values (forced entries +inf).
    num_selected: rounds.
    n_p: output width >= num_selected (a power of two).
    floor: entries at or below it are never picked.
    taken: the value a picked entry is overwritten with.

  Returns:
    int32 [rows, n_p], -1 in the slots no entry filled.
  """
  rows, width = ranked.shape
  j = jnp.arange(width)[None, :]
  slot = jnp.arange(n_p)[None, :]

  def body(r, carry):
    ranked, out = carry
    best = jnp.argmax(ranked, axis=1).astype(jnp.int32)  # [rows]
    value = jnp.max(ranked, axis=1)
    pick = jnp.where(value > floor, best, -1)
    out = jnp.where(slot == r, pick[:, None], out)
    ranked = jnp.where(j == best[:, None], taken, ranked)
    return ranked, out

  _, out = lax.fori_loop(0, num_selected, body,
                         (ranked, jnp.full((rows, n_p), -1, jnp.int32)))
  return out


def _top_n(scores, starts, st: _TopN, num_warps: int):
  """[B, Tq_p, Hkv, Ts_p] float32 -> int32 [B, Tq_p, Hkv, n_p].

  ``starts``: None, or int32 [B, Tq_p] padded document starts.
  """
  batch, seq_pad, hkv, sel_pad = scores.shape
  n_p = tc.next_pow2(st.num_selected)

  def bg(x):
    return lax.div(x, hkv), lax.rem(x, hkv)

  starts_spec, starts_arg = [], []
  if starts is not None:
    starts_spec = [pl.BlockSpec((None, st.rows), lambda x, i: (bg(x)[0], i))]
    starts_arg = [starts]
  return pl.pallas_call(
      functools.partial(_top_n_kernel, st=st),
      grid=(batch * hkv, seq_pad // st.rows),
      in_specs=[pl.BlockSpec((None, st.rows, None, sel_pad),
                             lambda x, i: (bg(x)[0], i, bg(x)[1], 0))]
      + starts_spec,
      out_specs=pl.BlockSpec((None, st.rows, None, n_p),
                             lambda x, i: (bg(x)[0], i, bg(x)[1], 0)),
      out_shape=jax.ShapeDtypeStruct((batch, seq_pad, hkv, n_p), jnp.int32),
      compiler_params=tc.compiler_params(num_warps, 1),
      interpret=st.interpret,
      name="nsa_block_top_n",
  )(scores, *starts_arg)


def _rows_per_program(block_q: int, sel_pad: int) -> tuple[int, int]:
  """(positions ranked per program, num_warps): <= 4k floats per warp.

  Measured on an H100 (T = 64k, Ts_p = 1024, Hq 64 / Hkv 4): one warp on
  [4, 1024] 1.76 ms; [1, 1024] / [2, 1024] 1.8 ms; [8, 1024] with 4 warps
  (the earlier default) 2.9 ms, with one warp 3.5 ms; [16, 1024] with 4
  warps 3.2 ms. Rows must divide ``block_q`` so the score tiles split
  evenly.
  """
  rows = max(1, min(block_q, 4096 // sel_pad))
  rows = 1 << (rows.bit_length() - 1)
  return rows, min(8, max(1, rows * sel_pad // 4096))


def supports_selection(config) -> bool:
  """Whether these kernels take ``config``'s block sizes (l'/d a power of 2)."""
  try:
    check_block_sizes(config.cmp_block, config.cmp_stride, config.sel_block)
  except ValueError:
    return False
  return True


def select_blocks(q, k_cmp, lse, *, cmp_block: int, cmp_stride: int,
                  sel_block: int, num_selected: int, num_initial: int,
                  num_local: int, scale: float | None = None,
                  interpret: bool | None = None,
                  launch: ScoreLaunch | None = None,
                  score_bytes: int = _SCORE_BYTES,
                  doc_starts=None):
  """Top-n selection blocks per (query, kv head), on the GPU (NSA Eq. 10-11).

  Forced blocks (the first ``num_initial`` and the ``num_local`` ending at
  the query's own block) first, then the other causal blocks by group-summed
  score, ties to the lower block index; slots beyond the number of causal
  blocks hold -1. With ``doc_starts`` the candidates start at the block of
  the query's document start, and "the first blocks" are counted from it.
  The same rule as ``nsa_jax.selection.top_n_at``.

  Args:
    q: [B, T, Hq, Dk] queries.
    k_cmp: [B, Tc, Hkv, Dk] compressed keys.
    lse: [B, T, Hq] float32 log-sum-exp of branch 1 (natural log).
    cmp_block, cmp_stride, sel_block: l, d, l' (l'/d a power of two).
    num_selected, num_initial, num_local: n and the forced counts.
    scale: branch 1's softmax scale, default 1/sqrt(Dk).
    interpret: run in Pallas interpret mode; None means "when no GPU".
    launch: score-kernel tiles; None: ``block_scores.default_launch``.
    score_bytes: float32 score bytes held at once; longer inputs are done
      in slices of query positions.
    doc_starts: optional int32 [B, T], non-decreasing, ``<= t``: the first
      position of each query's document (packed sequences).

  Returns:
    int32 [B, T, Hkv, num_selected], entries in [0, Ts) or -1, no repeats.

  Raises:
    ValueError: on inconsistent shapes or block sizes.
  """
  check_inputs(q, k_cmp, lse, cmp_block, cmp_stride, sel_block)
  batch, seq_len, num_heads, head_dim = q.shape
  num_kv_heads = k_cmp.shape[2]
  if num_selected < num_initial + num_local:
    raise ValueError(f"{num_selected=} < {num_initial=} + {num_local=}")
  if batch == 0 or seq_len == 0:
    return jnp.zeros((batch, seq_len, num_kv_heads, num_selected), jnp.int32)
  if launch is None:
    launch = default_launch(num_heads // num_kv_heads, seq_len, q.dtype,
                            head_dim)
  interpret = tc.resolve_interpret(interpret)
  scale = head_dim ** -0.5 if scale is None else float(scale)
  num_blocks = -(-seq_len // sel_block)
  sel_pad = tc.next_pow2(num_blocks, launch.block_sel)
  q, k_cmp, lse = jax.tree.map(jax.lax.stop_gradient, (q, k_cmp, lse))
  if k_cmp.shape[1] == 0:
    # No compressed token: every score is 0; ranking still applies.
    k_cmp = jnp.zeros((batch, 1, num_kv_heads, head_dim), q.dtype)
    lse = jnp.full(lse.shape, jnp.inf, jnp.float32)
  # Slices of whole score tiles whose scores fit in ``score_bytes``.
  per_position = batch * num_kv_heads * sel_pad * 4
  slice_len = max(launch.block_q,
                  (score_bytes // per_position) // launch.block_q
                  * launch.block_q)
  rows, num_warps = _rows_per_program(launch.block_q, sel_pad)
  tables = []
  for start in range(0, seq_len, slice_len):
    stop = min(seq_len, start + slice_len)
    starts = None
    if doc_starts is not None:
      starts = group_tiles.pad_starts(
          doc_starts[:, start:stop], tc.round_up(stop - start, launch.block_q),
          seq_len)
    scores = padded_scores(
        q[:, start:stop], k_cmp, lse[:, start:stop], cmp_block=cmp_block,
        cmp_stride=cmp_stride, sel_block=sel_block, scale=scale,
        seq_len=seq_len, q_offset=start, launch=launch, interpret=interpret,
        doc_starts=starts)
    st = _TopN(sel_block=sel_block, num_selected=num_selected,
               num_initial=num_initial, num_local=num_local,
               num_blocks=num_blocks, q_offset=start, rows=rows,
               interpret=interpret, documents=doc_starts is not None)
    tables.append(_top_n(scores, starts, st, num_warps=num_warps)[
        :, :stop - start, :, :num_selected])
  return tables[0] if len(tables) == 1 else jnp.concatenate(tables, axis=1)
