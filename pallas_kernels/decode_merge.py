"""A decode step's split partials, merged and gated in one Pallas launch.

The decode kernels (``decode_attention.launch``) leave each branch as split
partials: outputs normalised per split plus their log-sum-exps. Merging
them in XLA took three reduction fusions per branch and the gates one
more, each a launch of 1-2 us on an H100 at batch 1: more than half of a
one-token NSA step. Here one program per (row, kv head, group rows, Dv
columns) merges every branch by its log-sum-exps and adds the gated
results: one launch for the whole tail of the step.
``gated_merge_reference`` is the same in plain JAX.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from pallas_kernels import triton_compat as tc

# Floats of one [chunk, rows, columns] load of partial outputs.
_TILE = 4096
# Programs the grid aims for (rows, then columns, per program shrink).
_PROGRAMS = 256


class Branch(NamedTuple):
  """One branch: splits ``[first, first + count)`` of partials ``source``."""

  source: int
  first: int
  count: int


@dataclasses.dataclass(frozen=True)
class _Static:
  branches: tuple[Branch, ...]
  rows: int  # group rows per program
  columns: int  # Dv columns per program
  tile: int  # floats of one [chunk, rows, columns] load
  interpret: bool


def _merge_kernel(*refs, st: _Static):
  """Gated sum of each branch's merged partials for one tile of rows.

  Refs: per source o [S, rows, cols] float32, lse [S, rows] float32 (-inf:
  empty split); gates [rows, C] float32 (column i gates branch i) -> out
  [rows, cols].

  Each branch is merged online over loads of a few splits (rescaled by the
  running maximum, as flash-decoding's merge), so no load waits on another
  one's result: at batch 1 the step's tail is a few memory latencies, not
  one per branch and chunk.
  """
  gates_ref, out_ref = refs[-2], refs[-1]
  rows, cols = out_ref.shape
  acc = jnp.zeros((rows, cols), jnp.float32)
  for index, branch in enumerate(st.branches):
    o_ref, lse_ref = refs[2 * branch.source], refs[2 * branch.source + 1]
    chunk = _chunk(branch.count, rows * cols, st.tile)
    m = jnp.full((rows,), -jnp.inf, jnp.float32)
    total = jnp.zeros((rows,), jnp.float32)
    part = jnp.zeros((rows, cols), jnp.float32)
    for first in range(branch.first, branch.first + branch.count, chunk):
      lse = lse_ref[pl.ds(first, chunk), :]  # [chunk, rows]
      o = o_ref[pl.ds(first, chunk), :, :]  # [chunk, rows, cols]
      m_new = jnp.maximum(m, jnp.max(lse, axis=0))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp(m - m_safe)  # 0 while m is -inf
      w = jnp.where(lse > -jnp.inf, jnp.exp(lse - m_safe[None, :]), 0.0)
      total = alpha * total + jnp.sum(w, axis=0)
      part = alpha[:, None] * part + jnp.sum(w[:, :, None] * o, axis=0)
      m = m_new
    merged = part / jnp.where(total > 0.0, total, 1.0)[:, None]
    acc += gates_ref[:, index][:, None] * merged
  out_ref[...] = acc.astype(out_ref.dtype)


def _chunk(count: int, floats: int, tile: int) -> int:
  """Splits per load: the largest power of two whose ``floats`` each fit
  in ``tile`` (at least one), at most ``count``."""
  fit = max(1, tile // floats)
  return min(count, 1 << (fit.bit_length() - 1))


def _tiling(batch: int, num_kv_heads: int, group_p: int, dv: int):
  """(rows, columns) per program: group rows, then Dv columns (down to 16)
  halved until the grid has ``_PROGRAMS`` programs."""
  rows, cols = group_p, dv
  while batch * num_kv_heads * (group_p // rows) * (dv // cols) < _PROGRAMS:
    if rows > 1:
      rows //= 2
    elif cols > tc.MIN_DOT_DIM:
      cols //= 2
    else:
      break
  return rows, cols


def _check(parts, branches, gates):
  if not parts or not branches:
    raise ValueError("nothing to merge: no partials or no branches")
  b, hkv, _, group_p, dv = parts[0][0].shape
  for o, lse in parts:
    if o.ndim != 5 or o.shape[:2] + o.shape[3:] != (b, hkv, group_p, dv):
      raise ValueError(f"partials {o.shape} must be [B, Hkv, S, Gp, Dv] with "
                       f"(B, Hkv, Gp, Dv) = {(b, hkv, group_p, dv)}")
    if lse.shape != o.shape[:4]:
      raise ValueError(f"{lse.shape=} must be {o.shape[:4]} for partials "
                       f"{o.shape}")
  for branch in branches:
    if not 0 <= branch.source < len(parts):
      raise ValueError(f"{branch} names no partials (have {len(parts)})")
    splits = parts[branch.source][0].shape[2]
    count = branch.count
    if (branch.first < 0 or count < 1 or count & (count - 1)
        or branch.first + count > splits):
      raise ValueError(f"{branch}: count must be a power of two and the "
                       f"splits within the source's {splits}")
  if gates.shape[:3] != (b, hkv, group_p) or gates.shape[3] < len(branches):
    raise ValueError(f"{gates.shape=} must be [B, Hkv, Gp, >= "
                     f"{len(branches)}] for partials {parts[0][0].shape}")


def gated_merge(parts, branches, gates, *, dtype,
                interpret: bool | None = None):
  """``sum_i gates[..., i] * merge(branch i)`` in one kernel launch.

  Args:
    parts: sequence of (o float32 [B, Hkv, S, Gp, Dv] partial outputs, each
      normalised by its own sum; lse float32 [B, Hkv, S, Gp], -inf for an
      empty split), as ``decode_attention.launch`` returns them.
    branches: ``Branch`` per gate column: which partials and which of their
      splits (a power of two of them) make the branch.
    gates: float32 [B, Hkv, Gp, C], C >= len(branches); column i weights
      branch i.
    dtype: the output's dtype.
    interpret: Pallas interpret mode; None: when no GPU is present.

  Returns:
    [B, Hkv, Gp, Dv] in ``dtype``; a branch whose splits are all empty
    adds 0.

  Raises:
    ValueError: shapes or branches that do not fit.
  """
  branches = tuple(Branch(*x) for x in branches)
  _check(parts, branches, gates)
  b, hkv, _, group_p, _ = parts[0][0].shape
  rows, cols = _tiling(b, hkv, group_p, parts[0][0].shape[4])
  st = _Static(branches=branches, rows=rows, columns=cols, tile=_TILE,
               interpret=tc.resolve_interpret(interpret))
  return _merge(tuple(parts), gates.astype(jnp.float32), st,
                jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("st", "dtype"))
def _merge(parts, gates, st: _Static, dtype):
  b, hkv, _, group_p, dv = parts[0][0].shape
  rows, cols = st.rows, st.columns
  in_specs, args = [], []
  for o, lse in parts:
    splits = o.shape[2]
    in_specs += [
        pl.BlockSpec((None, None, splits, rows, cols),
                     lambda i, g, r, c: (i, g, 0, r, c)),
        pl.BlockSpec((None, None, splits, rows),
                     lambda i, g, r, c: (i, g, 0, r)),
    ]
    args += [o, lse]
  in_specs.append(pl.BlockSpec((None, None, rows, gates.shape[3]),
                               lambda i, g, r, c: (i, g, r, 0)))
  return pl.pallas_call(
      functools.partial(_merge_kernel, st=st),
      grid=(b, hkv, group_p // rows, dv // cols),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, rows, cols),
                             lambda i, g, r, c: (i, g, r, c)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, group_p, dv), dtype),
      compiler_params=tc.compiler_params(4, 1),
      interpret=st.interpret,
      name="decode_gated_merge",
  )(*args, gates)


def merge_reference(o, lse):
  """One branch's partials merged by their log-sum-exps, in plain JAX.

  Args:
    o: float32 [B, Hkv, S, Gp, Dv] partials, each normalised.
    lse: float32 [B, Hkv, S, Gp], -inf for an empty split.

  Returns:
    (out [B, Hkv, Gp, Dv], lse [B, Hkv, Gp]); 0 and -inf where all splits
    are empty.
  """
  m = jnp.max(lse, axis=2, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - m), 0.0)  # [B,Hkv,S,Gp]
  total = jnp.sum(w, axis=2)
  seen = total > 0
  out = jnp.sum(w[..., None] * o, axis=2) / jnp.where(seen, total, 1.0)[
      ..., None]
  return out, jnp.where(seen, m[:, :, 0] + jnp.log(
      jnp.where(seen, total, 1.0)), -jnp.inf)


def gated_merge_reference(parts, branches, gates, *, dtype):
  """``gated_merge`` in plain JAX (the XLA merge it replaces)."""
  acc = 0.0
  for index, (source, first, count) in enumerate(branches):
    o, lse = parts[source]
    out, _ = merge_reference(o[:, :, first:first + count],
                             lse[:, :, first:first + count])
    acc = acc + gates[..., index:index + 1].astype(jnp.float32) * out
  return acc.astype(dtype)
