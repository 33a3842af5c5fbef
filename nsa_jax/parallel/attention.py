"""NSA over a device mesh, and the switch that sends layers there.

``sharded_nsa_attention`` computes ``ops.nsa_attention`` on arrays laid out
over a mesh (``nsa_jax.parallel.mesh``): batch over (data, fsdp), heads
over tensor, the sequence over ``sequence``. It runs one ``shard_map``:
each device computes its block with the single-device implementations,
the Pallas kernels included, and the only communication is what NSA's
branches need across the sequence split (``ContextParallel``; the designs
and their bytes: docs/CONTEXT_PARALLEL.md):

  "allgather"  sequence split. Branch 1: compressed K/V all-gathered (they
               are T/d tokens). Branch 3: the previous shards' last w - 1
               keys by ppermute (``halo``). Branch 2: all of K/V
               all-gathered (``selected.allgather``).
  "gather"     as "allgather", but branch 2 fetches only the picked remote
               blocks (``selected.gather_selected``; T/P a multiple of l').
  "heads"      all-to-all from sequence to head shards (as DeepSpeed
               Ulysses), ``ops.nsa_attention`` unchanged on the whole
               sequence of Hkv/P kv heads, all-to-all back. Hkv/tensor must
               divide by P.

In the sequence-split strategies branches 1 and 2 run ``impl``'s
implementations (the Pallas kernels on a GPU) with the shard's query
offset, traced (one program for every shard) and read by the kernels as
an input; the selection runs in XLA (``selection.block_scores(q_offset=)``
and ``top_n_at``); branch 3 runs ``impl``'s window implementation on the
halo frame. "heads" runs ``impl`` for everything.

``nsa_attention`` is what ``NSAAttention`` calls: ``ops.nsa_attention``,
unless a mesh was made active with ``activate`` (the sharded train step
does), in which case the layer runs ``sharded_nsa_attention`` on it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nsa_jax import ops
from nsa_jax import reference
from nsa_jax import selection
from nsa_jax.config import NSAConfig
from nsa_jax.parallel import compat
from nsa_jax.parallel import halo
from nsa_jax.parallel import rules
from nsa_jax.parallel import selected
from nsa_jax.parallel.mesh import axis_size

STRATEGIES = ("allgather", "gather", "heads")


@dataclasses.dataclass(frozen=True)
class ContextParallel:
  """How NSA runs when the sequence axis of the mesh is split.

  Attributes:
    strategy: "allgather", "gather" or "heads" (module docstring).
    capacity: with "gather", remote blocks per (source shard, batch row,
      kv head) one call may fetch before it falls back to "allgather".
    axis: the mesh axis that splits the sequence.
  """

  strategy: str = "allgather"
  capacity: int = 4
  axis: str = "sequence"

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"context-parallel strategy={self.strategy!r} is not "
                       f"one of {STRATEGIES}")
    if isinstance(self.capacity, bool) or not isinstance(
        self.capacity, int) or self.capacity < 1:
      raise ValueError(f"context-parallel capacity={self.capacity!r} must be "
                       "a positive int (blocks)")


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where the arrays of one call live on the mesh."""

  batch: tuple[str, ...] | str | None
  heads: str | None
  seq: str | None
  num_shards: int

  def spec(self, *, seq: bool = True) -> P:
    return P(self.batch, self.seq if seq else None, self.heads, None)


def _layout(mesh, q, k, seq_len, config, context) -> _Layout:
  """The mesh axes of batch, heads and sequence; refuses splits that do not
  divide the shapes, naming them."""
  batch = rules.mesh_spec(("batch",), mesh)[0]
  heads = "tensor" if axis_size(mesh, "tensor") > 1 else None
  shards = axis_size(mesh, context.axis)
  splits = {"batch": (q.shape[0], rules.split_size(batch, mesh)),
            "query heads": (q.shape[2], axis_size(mesh, "tensor")),
            "kv heads": (k.shape[2], axis_size(mesh, "tensor")),
            "sequence": (seq_len, shards)}
  for what, (size, parts) in splits.items():
    if size % parts:
      raise ValueError(f"sharded NSA: {what} = {size} does not split into "
                       f"{parts} shards on mesh {dict(mesh.shape)}")
  if shards > 1 and context.strategy == "gather" and (
      seq_len // shards) % config.sel_block:
    raise ValueError(
        f"context-parallel 'gather' needs the shard length T / P = "
        f"{seq_len} / {shards} to be a multiple of sel_block = "
        f"{config.sel_block}; use 'allgather'")
  if shards > 1 and context.strategy == "heads" and (
      k.shape[2] // axis_size(mesh, "tensor")) % shards:
    raise ValueError(
        f"context-parallel 'heads' splits the {k.shape[2]} kv heads (per "
        f"tensor shard) over {shards} sequence shards; they must divide")
  return _Layout(batch=batch, heads=heads,
                 seq=context.axis if shards > 1 else None, num_shards=shards)


@dataclasses.dataclass(frozen=True)
class _Branches:
  """The implementations a sequence shard runs (``ops`` signatures).

  ``compressed`` and ``selected`` take ``q_offset``: the shard's queries sit
  at positions o .. o + Tl - 1 of the keys they are given.
  """

  compressed: Callable
  selected: Callable
  window: Callable


def _branches(impl, config, q, k, v, k_cmp, v_cmp, k_win, v_win, scale):
  """What ``ops.nsa_attention(impl=...)`` would run for branches 1-3."""
  if impl == "reference":
    return _Branches(reference.compressed_attention_reference,
                     reference.selected_attention_reference,
                     reference.sliding_window_attention_reference)
  chosen = ops.resolve_nsa(impl, config, q, k, v, k_cmp, v_cmp, k_win=k_win,
                           v_win=v_win, scale=scale)
  return _Branches(chosen["compressed_attention"].fn,
                   chosen["selected_attention"].fn,
                   chosen["sliding_window_attention"].fn)


def _gather_compressed(x, num_cmp, axis):
  """Compressed tokens from their padded sequence split: [B, Tc, Hkv, D]."""
  return lax.all_gather(x, axis, axis=1, tiled=True)[:, :num_cmp]


def _sequence_split(q, k, v, gates, k_cmp, v_cmp, k_win, v_win, *, config,
                    scale, branches, context, num_shards, num_cmp):
  """One sequence shard of NSA (inside shard_map): Tl positions from
  o = shard * Tl, compressed tokens as padded shards of Tc."""
  axis = context.axis
  tl = q.shape[1]
  offset = lax.axis_index(axis) * tl
  k_cmp = _gather_compressed(k_cmp, num_cmp, axis)
  v_cmp = _gather_compressed(v_cmp, num_cmp, axis)
  o_cmp, lse = branches.compressed(
      q, k_cmp, v_cmp, block_size=config.cmp_block, stride=config.cmp_stride,
      scale=scale, q_offset=offset)
  q_s, k_cmp_s, lse_s = lax.stop_gradient((q, k_cmp, lse))
  scores = selection.block_scores(q_s, k_cmp_s, lse_s, config, scale=scale,
                                  q_offset=offset, seq_len=tl * num_shards)
  positions = jnp.broadcast_to(offset + jnp.arange(tl), q.shape[:2])
  blocks = selection.top_n_at(scores, positions, config)
  branch2 = dict(block_size=config.sel_block, scale=scale, axis=axis,
                 attend=branches.selected)
  if context.strategy == "gather":
    o_slc = selected.gather_selected(q, k, v, blocks, num_shards=num_shards,
                                     capacity=context.capacity, **branch2)
  else:
    o_slc = selected.allgather(q, k, v, blocks, **branch2)
  q_f, k_f, v_f, start = halo.window_frame(q, k_win, v_win,
                                           window=config.window, axis=axis,
                                           num_shards=num_shards)
  o_win = halo.read_rows(branches.window(q_f, k_f, v_f, window=config.window,
                                         scale=scale), start, tl)
  return ops.combine_branches(gates, o_cmp, o_slc, o_win)


def _heads_split(q, k, v, gates, k_cmp, v_cmp, k_win, v_win, *, config,
                 scale, impl, context, num_shards, num_cmp):
  """One device's kv heads over the whole sequence (inside shard_map)."""
  axis = context.axis
  to_heads = lambda x: lax.all_to_all(x, axis, 2, 1, tiled=True)
  hkv = k.shape[2] // num_shards

  def my_heads(x):
    x = _gather_compressed(x, num_cmp, axis)
    return lax.dynamic_slice_in_dim(x, lax.axis_index(axis) * hkv, hkv,
                                    axis=2)

  out = ops.nsa_attention(
      to_heads(q), to_heads(k), to_heads(v), to_heads(gates), config,
      k_cmp=my_heads(k_cmp), v_cmp=my_heads(v_cmp), k_win=to_heads(k_win),
      v_win=to_heads(v_win), scale=scale, impl=impl)
  return lax.all_to_all(out, axis, 1, 2, tiled=True)


def sharded_nsa_attention(q, k, v, gates, config: NSAConfig, *, k_cmp, v_cmp,
                          mesh: jax.sharding.Mesh, k_win=None, v_win=None,
                          scale=None, impl: str = "auto",
                          context: ContextParallel = ContextParallel()):
  """``ops.nsa_attention`` of global arrays laid out over ``mesh``.

  Args:
    q, k, v, gates, config, k_cmp, v_cmp, k_win, v_win, scale, impl: as
      ``ops.nsa_attention`` (the global, unsplit shapes).
    mesh: the device mesh; batch splits over its data and fsdp axes, heads
      over tensor, the sequence over ``context.axis``.
    context: how the branches cross the sequence split.

  Returns:
    [B, T, Hq, Dv] in q.dtype, split like q.

  Raises:
    ValueError, TypeError: what ``ops.nsa_attention`` refuses, a mesh whose
      axes do not divide batch, heads or T, or a strategy that cannot serve.
  """
  k_win = k if k_win is None else k_win
  v_win = v if v_win is None else v_win
  # The single-device op's checks, on shapes only.
  jax.eval_shape(functools.partial(ops.nsa_attention, config=config,
                                   scale=scale, impl=impl),
                 q, k, v, gates, k_cmp=k_cmp, v_cmp=v_cmp, k_win=k_win,
                 v_win=v_win)
  seq_len = q.shape[1]
  layout = _layout(mesh, q, k, seq_len, config, context)
  if 0 in q.shape[:2]:
    return jnp.zeros((*q.shape[:3], v.shape[3]), q.dtype)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  num_cmp = k_cmp.shape[1]
  local, full = layout.spec(), layout.spec(seq=False)
  if layout.num_shards == 1:
    body = functools.partial(ops.nsa_attention, config=config, scale=scale,
                             impl=impl)
    run = lambda q, k, v, g, kc, vc, kw, vw: body(
        q, k, v, g, k_cmp=kc, v_cmp=vc, k_win=kw, v_win=vw)
    cmp_spec = full
  else:
    # Compressed tokens travel as a padded sequence split, all-gathered in.
    pad = -num_cmp % layout.num_shards
    k_cmp, v_cmp = (jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)])
                    for x in (k_cmp, v_cmp))
    cmp_spec = local
    if context.strategy == "heads":
      run = functools.partial(_heads_split, config=config, scale=scale,
                              impl=impl, context=context,
                              num_shards=layout.num_shards, num_cmp=num_cmp)
    else:
      branches = _branches(impl, config, q, k, v, k_cmp[:, :num_cmp],
                           v_cmp[:, :num_cmp], k_win, v_win, scale)
      run = functools.partial(_sequence_split, config=config, scale=scale,
                              branches=branches, context=context,
                              num_shards=layout.num_shards, num_cmp=num_cmp)
  mapped = compat.shard_map(
      run, mesh=mesh,
      in_specs=(local, local, local, local, cmp_spec, cmp_spec, local, local),
      out_specs=local)
  return mapped(q, k, v, gates, k_cmp, v_cmp, k_win, v_win)


@dataclasses.dataclass(frozen=True)
class _Active:
  mesh: jax.sharding.Mesh
  context: ContextParallel


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar(
    "nsa_jax_parallel_mesh", default=None)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh,
             context: ContextParallel = ContextParallel()):
  """NSA layers traced inside this block run ``sharded_nsa_attention`` on
  ``mesh``. Read when a function is traced: a jitted function keeps what
  was active at its first trace."""
  token = _ACTIVE.set(_Active(mesh, context))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def nsa_attention(q, k, v, gates, config: NSAConfig, *, k_cmp, v_cmp,
                  k_win=None, v_win=None, scale=None, segment_ids=None,
                  impl="auto"):
  """``ops.nsa_attention``, sharded over the active mesh if there is one.

  Same arguments and result as ``ops.nsa_attention``; see ``activate``.

  Raises:
    NotImplementedError: ``segment_ids`` (packed documents) on an active
      mesh: the sharded path does not carry them yet.
  """
  active = _ACTIVE.get()
  kwargs = dict(k_cmp=k_cmp, v_cmp=v_cmp, k_win=k_win, v_win=v_win,
                scale=scale, impl=impl)
  if active is None:
    return ops.nsa_attention(q, k, v, gates, config, segment_ids=segment_ids,
                             **kwargs)
  if segment_ids is not None:
    raise NotImplementedError(
        "packed documents (segment_ids, train_lm.py --documents) are not "
        "supported with a device mesh yet; train them on one device")
  return sharded_nsa_attention(q, k, v, gates, config, mesh=active.mesh,
                               context=active.context, **kwargs)
