"""The functional NSA API (docs/SEMANTICS.md): each op and its registry.

The layers are drawn in docs/ARCHITECTURE.md.

Every attention op takes ``impl``: a name registered for it or "auto".
  "reference"  dense, masked, float32 (``nsa_jax.reference``): the oracle.
  "xla"        chunked, never ``T x T`` (``nsa_jax.xla``): CPU/TPU, fallback.
  "pallas"     Pallas Triton kernels (``nsa_jax.impls.pallas``); interpret
               mode when no GPU is present (how the CPU tests run them).
  "cudnn"      cuDNN's fused window (``nsa_jax.impls.cudnn``), the window
               branch only; GPU, bf16/fp16.
  "auto"       the first implementation offered on this backend that
               supports the call: cudnn (window), then pallas on a GPU;
               xla everywhere.
``implementations(op, ...)`` lists them and says which would serve a call.

A public call checks its inputs once, in Python before tracing (a bad one
raises ValueError or TypeError naming the argument), resolves ``impl``
(an explicit one that cannot serve raises ValueError saying why), then runs
the implementation under ``jax.jit``. ``nsa_attention`` resolves every
branch up front and calls the implementations directly.

Semantics every path shares (see docs/ARCHITECTURE.md): a block index
outside [0, ceil(T / l')) is an empty slot like -1 and a repeated one counts
once; a key a query cannot see contributes nothing whatever its k and v
hold; a query that sees a non-finite key or value gets NaN; B = 0 or T = 0
gives empty outputs.

Packed sequences: every attention op takes ``segment_ids`` (int [B, T], a
document is a run of equal ids; ``segments.from_cu_seqlens`` converts
cumulative lengths). A query then reads only keys of its own document: raw
keys per token, a compressed token only if its whole block lies in the
document, and selection ranks and forces blocks from the document's first
block on (docs/SEMANTICS.md, "Packed sequences"). ``segment_ids=None`` is
the unsegmented computation, unchanged; an implementation that cannot
express documents (cuDNN's window) refuses segmented calls, so "auto" and
"pallas" route them elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import reference
from nsa_jax import registry
from nsa_jax import segments
from nsa_jax import selection
from nsa_jax import validation
from nsa_jax import xla
from nsa_jax.config import NSAConfig
from nsa_jax.impls import cudnn
from nsa_jax.impls import pallas

GPU = ("gpu",)
EVERYWHERE = ("cpu", "gpu", "tpu")

# One registry per op; "auto" tries them in this order.
COMPRESSED = registry.Registry("compressed_attention")
COMPRESSED.register("pallas", pallas.compressed_attention,
                    pallas.supports_compressed, auto_backends=GPU)
COMPRESSED.register("xla", xla.compressed_attention,
                    auto_backends=EVERYWHERE)
COMPRESSED.register("reference", reference.compressed_attention_reference)

BLOCK_SCORES = registry.Registry("block_scores")
BLOCK_SCORES.register("pallas", pallas.block_scores,
                      pallas.supports_select, auto_backends=GPU)
BLOCK_SCORES.register(
    "xla", lambda q, k_cmp, lse, *, config, **kw: selection.block_scores(
        q, k_cmp, lse, config, **kw), auto_backends=EVERYWHERE)
BLOCK_SCORES.register(
    "reference",
    lambda q, k_cmp, lse, *, config, **kw: reference.block_scores_reference(
        q, k_cmp, lse, config, **kw))

SELECT = registry.Registry("select_blocks")
SELECT.register("pallas", pallas.select_blocks, pallas.supports_select,
                auto_backends=GPU)
SELECT.register("xla", selection.select_blocks, auto_backends=EVERYWHERE)
SELECT.register(
    "reference", lambda q, k_cmp, lse, *, config, scale, segment_ids=None: (
        selection.top_n_blocks(reference.block_scores_reference(
            q, k_cmp, lse, config, scale=scale, segment_ids=segment_ids),
            config, segment_ids=segment_ids)))

SELECTED = registry.Registry("selected_attention")
SELECTED.register("pallas", pallas.selected_attention,
                  pallas.supports_selected, auto_backends=GPU)
SELECTED.register("xla", xla.selected_attention, auto_backends=EVERYWHERE)
SELECTED.register("reference", reference.selected_attention_reference)

WINDOW = registry.Registry("sliding_window_attention")
WINDOW.register("cudnn", cudnn.sliding_window_attention,
                cudnn.supports_window, auto_backends=GPU)
WINDOW.register("pallas", pallas.sliding_window_attention,
                pallas.supports_window, auto_backends=GPU)
WINDOW.register("xla", xla.sliding_window_attention,
                auto_backends=EVERYWHERE)
WINDOW.register("reference", reference.sliding_window_attention_reference)

REGISTRIES = {r.op: r for r in (COMPRESSED, BLOCK_SCORES, SELECT, SELECTED,
                                 WINDOW)}

# What nsa_attention(impl=...) runs per branch: a name, "auto", or names
# tried in order ("pallas" keeps cuDNN's window where it serves, as the GPU
# kernels always have).
NSA_IMPLS = ("auto", "pallas", "xla", "reference")
_NSA_WINDOW = {"pallas": ("cudnn", "pallas")}


def implementations(op: str, *args, **kwargs):
  """What implements ``op``, and which of them can serve a call.

  Args:
    op: "compressed_attention", "block_scores", "select_blocks",
      "selected_attention" or "sliding_window_attention".
    *args, **kwargs: optionally, the arguments of a call (arrays or
      ``jax.ShapeDtypeStruct``; ``scale`` and ``segment_ids`` may be left
      out).

  Returns:
    Without arguments: the names, in the order "auto" tries them. With
    arguments: a dict name -> None (can serve) or the reason it cannot, plus
    "auto" -> the name "auto" picks (or the reason none can).
  """
  if op not in REGISTRIES:
    raise ValueError(f"op={op!r} is not one of {tuple(REGISTRIES)}")
  reg = REGISTRIES[op]
  if not args and not kwargs:
    return reg.names()
  impl = kwargs.pop("impl", "auto")
  kwargs.setdefault("scale", None)
  reasons = reg.reasons(*args, **kwargs)
  try:
    reasons["auto"] = reg.resolve(impl, *args, **kwargs).name
  except ValueError as e:
    reasons["auto"] = str(e)
  return reasons


def resolve_impl(impl: str) -> str:
  """The family "auto" means here: "pallas" on a GPU, "xla" elsewhere.

  Per-call choices (cuDNN's window, the xla fallback for an l' the kernel
  lacks) are the registries'; see ``implementations``.
  """
  validation.check_impl(impl)
  if impl != "auto":
    return impl
  return "pallas" if jax.default_backend() == "gpu" else "xla"


def _scale(q, scale):
  return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _check_static(op, **static):
  for name, value in static.items():
    try:
      hash(value)
    except TypeError:
      raise TypeError(f"{op}: {name}={value!r} must be hashable (it is a "
                      "static argument)") from None


def _optional(segment_ids, q_offset=0):
  """Keyword arguments passing the optional inputs that were given.

  Segment ids, and a query offset other than the int 0. Calls without them
  pass nothing, so they are exactly the calls of a library without
  documents or offsets.
  """
  given = {} if segment_ids is None else dict(segment_ids=segment_ids)
  if validation.is_offset(q_offset):
    given["q_offset"] = q_offset
  return given


def _call(fn, static, optional, *arrays):
  """fn(*arrays, **optional, **static): ``optional`` holds traced inputs."""
  return fn(*arrays, **optional, **dict(static))


_run = jax.jit(_call, static_argnums=(0, 1))


def _empty(q):
  """B = 0 or T = 0: nothing to compute (no kernel takes an empty grid)."""
  return q.shape[0] == 0 or q.shape[1] == 0


def compressed_attention(q, k_cmp, v_cmp, *, block_size, stride, scale=None,
                         segment_ids=None, q_offset=0, impl="auto"):
  """Branch 1: attention over compressed tokens whose block is in the past.

  Args:
    q: [B, T, Hq, Dk] queries.
    k_cmp: [B, Tc, Hkv, Dk] compressed keys, Tc = max(0, (T - l) // d + 1).
    v_cmp: [B, Tc, Hkv, Dv] compressed values.
    block_size: l, raw tokens per compressed token, a multiple of d.
    stride: d, distance between compressed blocks.
    scale: softmax scale, default 1/sqrt(Dk).
    segment_ids: optional int [B, T] (packed documents): query t also needs
      every key of token i's block ``[i*d, i*d + l)`` in its document.
    q_offset: position of q's first row, an int or an int scalar array
      (traced inside ``shard_map``): row r is query t = q_offset + r and
      k_cmp holds the tokens of a sequence of at least q_offset + T
      positions (context parallelism: one shard's queries against every
      compressed token). Not with ``segment_ids``.
    impl: see ``implementations("compressed_attention")``.

  Returns:
    (out [B, T, Hq, Dv] in q.dtype, lse [B, T, Hq] float32; float64 for
    float64 inputs on the xla/reference paths). A query with no visible
    compressed token (t < l - 1, or its document so far shorter than l)
    gets out = 0 and lse = -inf.

  Raises:
    ValueError, TypeError: shapes, dtypes, q_offset or impl that do not fit.
  """
  _check_static("compressed_attention", block_size=block_size, stride=stride,
                scale=scale, impl=impl)
  validation.check_attention(q, k_cmp, v_cmp, k_name="k_cmp", v_name="v_cmp",
                             same_length=False)
  validation.check_compressed(q, k_cmp, block_size, stride, q_offset)
  validation.check_segment_ids(segment_ids, q)
  segments.check_whole_sequence(segment_ids, q_offset)
  static = dict(block_size=block_size, stride=stride, scale=_scale(q, scale))
  optional = _optional(segment_ids, q_offset)
  chosen = COMPRESSED.resolve(impl, q, k_cmp, v_cmp, **optional, **static)
  if _empty(q):
    lse_dtype = jnp.promote_types(q.dtype, jnp.float32)
    return (jnp.zeros((*q.shape[:3], v_cmp.shape[3]), q.dtype),
            jnp.full(q.shape[:3], -jnp.inf, lse_dtype))
  return _run(chosen.fn, tuple(static.items()), optional, q, k_cmp, v_cmp)


def block_scores(q, k_cmp, lse, config: NSAConfig, *, scale=None,
                 segment_ids=None, impl="auto"):
  """Group-summed selection-block importance P (spec, branch 2).

  Args:
    q: [B, T, Hq, Dk]; k_cmp: [B, Tc, Hkv, Dk]; lse: float32 [B, T, Hq], the
      log-sum-exp returned by ``compressed_attention``.
    config: block sizes.
    scale: the scale used for ``lse``.
    segment_ids: optional int [B, T], as given to ``compressed_attention``:
      only the tokens it let a query see score.
    impl: see ``implementations("block_scores")``.

  Returns:
    float32 [B, T, Hkv, Ts], before forcing and causal masking (blocks
    before the one holding a query's document start may hold anything on
    the pallas path; selection never reads them). Not differentiable
    (inputs are wrapped in stop_gradient).
  """
  _check_block_scores(q, k_cmp, lse, config, scale, impl, segment_ids)
  static = dict(config=config, scale=_scale(q, scale))
  chosen = BLOCK_SCORES.resolve(impl, q, k_cmp, lse, segment_ids=segment_ids,
                                **static)
  if _empty(q):
    return jnp.zeros((*q.shape[:2], k_cmp.shape[2],
                      config.num_selection_blocks(q.shape[1])), jnp.float32)
  q, k_cmp, lse = jax.lax.stop_gradient((q, k_cmp, lse))
  return _run(chosen.fn, tuple(static.items()), _optional(segment_ids), q,
              k_cmp, lse)


def _check_block_scores(q, k_cmp, lse, config, scale, impl, segment_ids):
  validation.check_config(config)
  _check_static("block_scores", scale=scale, impl=impl)
  validation.check_rank4(q=q, k_cmp=k_cmp)
  validation.check_float(q=q, k_cmp=k_cmp)
  validation.check_heads_and_dims(q, k_cmp, k_cmp, k_name="k_cmp",
                                  v_name="k_cmp")
  validation.check_lse(lse, q)
  validation.check_compressed(q, k_cmp, config.cmp_block, config.cmp_stride)
  if q.shape[0] != k_cmp.shape[0]:
    raise ValueError(f"{q.shape=} and {k_cmp.shape=} disagree on batch")
  validation.check_segment_ids(segment_ids, q)


def select_blocks(q, k_cmp, lse, config: NSAConfig, *, scale=None,
                  segment_ids=None, impl="auto"):
  """Top-n selection blocks per (query, kv head), shared by the GQA group.

  Args:
    q: [B, T, Hq, Dk]; k_cmp: [B, Tc, Hkv, Dk]; lse: float32 [B, T, Hq].
    config: selection settings (``num_selected``, forced blocks, sizes).
    scale: the scale used for ``lse``.
    segment_ids: optional int [B, T], as given to ``compressed_attention``:
      a query's candidates are the blocks from the one holding its
      document's first position to its own; "the first ``num_initial``
      blocks" are counted from that block.
    impl: see ``implementations("select_blocks")``: "pallas" scores and
      ranks on the GPU (``pallas_kernels.block_select``, no XLA top_k);
      "xla" and "reference" score in XLA and rank by ``jax.lax.top_k``.

  Returns:
    int32 [B, T, Hkv, num_selected], entries in [0, Ts) or -1, no repeats.
    Implementations that sum the same probabilities in another order may
    break near-ties (scores equal to float32 rounding) differently.
  """
  _check_block_scores(q, k_cmp, lse, config, scale, impl, segment_ids)
  static = dict(config=config, scale=_scale(q, scale))
  chosen = SELECT.resolve(impl, q, k_cmp, lse, segment_ids=segment_ids,
                          **static)
  if _empty(q):
    return jnp.zeros((*q.shape[:2], k_cmp.shape[2], config.num_selected),
                     jnp.int32)
  q, k_cmp, lse = jax.lax.stop_gradient((q, k_cmp, lse))
  return _run(chosen.fn, tuple(static.items()), _optional(segment_ids), q,
              k_cmp, lse)


def selected_attention(q, k, v, block_indices, *, block_size, scale=None,
                       segment_ids=None, q_offset=0, impl="auto"):
  """Branch 2: attention over keys s <= t in the selected blocks of (t, h//G).

  Args:
    q: [B, T, Hq, Dk]; k: [B, S, Hkv, Dk]; v: [B, S, Hkv, Dv]; S = T unless
      ``q_offset`` is given, then S >= q_offset + T.
    block_indices: int [B, T, Hkv, n]: selected blocks. An entry outside
      [0, ceil(S / l')) (-1 by convention) is an empty slot; a block named
      twice in a row counts once.
    block_size: l', raw tokens per selection block.
    scale: softmax scale, default 1/sqrt(Dk).
    segment_ids: optional int [B, T]: keys outside the query's document are
      masked per token (a block straddling a boundary is read in part).
    q_offset: key position of q's first row, an int or an int scalar array
      (traced inside ``shard_map``): row r is query t = q_offset + r
      (context parallelism: one shard's queries against gathered keys).
      Not with ``segment_ids``.
    impl: see ``implementations("selected_attention")``.

  Returns:
    [B, T, Hq, Dv] in q.dtype; 0 for a query whose slots hold no key it may
    read.

  Raises:
    ValueError, TypeError: shapes, dtypes, q_offset or impl that do not fit.
  """
  _check_static("selected_attention", block_size=block_size, scale=scale,
                impl=impl)
  offset = validation.is_offset(q_offset)
  validation.check_attention(q, k, v, same_length=not offset)
  if offset:
    validation.check_key_length(q, k, q_offset)
  validation.check_block_indices(block_indices, q, k)
  validation.check_positive_int(block_size=block_size)
  validation.check_segment_ids(segment_ids, q)
  segments.check_whole_sequence(segment_ids, q_offset)
  static = dict(block_size=block_size, scale=_scale(q, scale))
  optional = _optional(segment_ids, q_offset)
  chosen = SELECTED.resolve(impl, q, k, v, block_indices, **optional,
                            **static)
  if _empty(q):
    return jnp.zeros((*q.shape[:3], v.shape[3]), q.dtype)
  return _run(chosen.fn, tuple(static.items()), optional, q, k, v,
              block_indices)


def sliding_window_attention(q, k, v, *, window, scale=None, segment_ids=None,
                             impl="auto"):
  """Branch 3: query t attends to keys t - w < s <= t.

  Args:
    q: [B, T, Hq, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv].
    window: w >= 1.
    scale: softmax scale, default 1/sqrt(Dk).
    segment_ids: optional int [B, T]: keys also need to be in the query's
      document (cuDNN cannot serve such a call; "auto" then runs Pallas on
      a GPU).
    impl: see ``implementations("sliding_window_attention")``.

  Returns:
    [B, T, Hq, Dv] in q.dtype.
  """
  _check_static("sliding_window_attention", window=window, scale=scale,
                impl=impl)
  validation.check_attention(q, k, v)
  validation.check_positive_int(window=window)
  validation.check_segment_ids(segment_ids, q)
  static = dict(window=window, scale=_scale(q, scale))
  chosen = WINDOW.resolve(impl, q, k, v, segment_ids=segment_ids, **static)
  if _empty(q):
    return jnp.zeros((*q.shape[:3], v.shape[3]), q.dtype)
  return _run(chosen.fn, tuple(static.items()), _optional(segment_ids), q, k,
              v)


def resolve_nsa(impl, config: NSAConfig, q, k, v, k_cmp, v_cmp, *,
                k_win=None, v_win=None, scale=None, segment_ids=None):
  """The implementation of each branch that ``nsa_attention`` would run.

  Args:
    impl: one of ``NSA_IMPLS``.
    config: NSA hyper-parameters.
    q, k, v, k_cmp, v_cmp, k_win, v_win: arrays or ``jax.ShapeDtypeStruct``
      shaped as ``nsa_attention`` takes them.
    scale: softmax scale.
    segment_ids: None or the call's int [B, T] segment ids (array or
      ``jax.ShapeDtypeStruct``): implementations without documents refuse.

  Returns:
    dict op name -> ``registry.Implementation`` (empty for "reference",
    which runs the whole dense oracle).

  Raises:
    ValueError: an unknown impl, or a branch it cannot serve (with why).
  """
  if impl not in NSA_IMPLS:
    raise ValueError(f"nsa_attention: impl={impl!r} is not one of "
                     f"{NSA_IMPLS}")
  if impl == "reference":
    return {}
  k_win = k if k_win is None else k_win
  v_win = v if v_win is None else v_win
  scale = _scale(q, scale)
  lse = jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)
  idx = jax.ShapeDtypeStruct((*q.shape[:2], k.shape[2], config.num_selected),
                             jnp.int32)
  seg = dict(segment_ids=segment_ids)
  return {
      "compressed_attention": COMPRESSED.resolve(
          impl, q, k_cmp, v_cmp, block_size=config.cmp_block,
          stride=config.cmp_stride, scale=scale, **seg),
      "select_blocks": SELECT.resolve(impl, q, k_cmp, lse, config=config,
                                      scale=scale, **seg),
      "selected_attention": SELECTED.resolve(
          impl, q, k, v, idx, block_size=config.sel_block, scale=scale,
          **seg),
      "sliding_window_attention": WINDOW.resolve(
          _NSA_WINDOW.get(impl, impl), q, k_win, v_win,
          window=config.window, scale=scale, **seg),
  }


def check_nsa_support(config: NSAConfig, impl: str, *, num_heads: int,
                      num_kv_heads: int, head_dim: int, v_head_dim: int,
                      dtype) -> None:
  """Raises ValueError now if ``impl`` cannot run NSA with these settings.

  What ``NSAAttention`` asks at construction, before any input exists: the
  branches are resolved on abstract inputs of these head counts, dims and
  dtype (at a length of two selection blocks).
  """
  validation.check_config(config)
  seq_len = 2 * config.sel_block
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  num_cmp = config.num_compressed(seq_len)
  resolve_nsa(impl, config, spec(1, seq_len, num_heads, head_dim),
              spec(1, seq_len, num_kv_heads, head_dim),
              spec(1, seq_len, num_kv_heads, v_head_dim),
              spec(1, num_cmp, num_kv_heads, head_dim),
              spec(1, num_cmp, num_kv_heads, v_head_dim))


def nsa_attention(q, k, v, gates, config: NSAConfig, *, k_cmp, v_cmp,
                  k_win=None, v_win=None, scale=None, segment_ids=None,
                  impl="auto"):
  """Native Sparse Attention: gated sum of compressed, selected and window.

  Args:
    q: [B, T, Hq, Dk] queries.
    k, v: [B, T, Hkv, Dk], [B, T, Hkv, Dv] raw keys/values of the selection
      branch (and of the window unless ``k_win, v_win`` are given).
    gates: [B, T, Hq, 3] in [0, 1], order (cmp, slc, win).
    config: NSA hyper-parameters.
    k_cmp, v_cmp: [B, Tc, Hkv, Dk], [B, Tc, Hkv, Dv] compressed keys/values,
      Tc = config.num_compressed(T).
    k_win, v_win: optional window-branch keys/values, shaped like k, v.
    scale: softmax scale of all branches, default 1/sqrt(Dk).
    segment_ids: optional int [B, T]: packed documents; every branch reads
      only the query's document (docs/SEMANTICS.md, "Packed sequences").
    impl: "auto", "pallas", "xla" or "reference": every branch's (with
      "pallas", the window takes cuDNN where it serves; "auto" picks per
      branch, see ``implementations``).

  Returns:
    [B, T, Hq, Dv] in q.dtype.
  """
  validation.check_config(config)
  _check_static("nsa_attention", scale=scale, impl=impl)
  validation.check_attention(q, k, v)
  validation.check_gates(gates, q)
  if (k_win is None) != (v_win is None):
    raise ValueError("give both k_win and v_win, or neither")
  k_win = k if k_win is None else k_win
  v_win = v if v_win is None else v_win
  validation.check_attention(q, k_win, v_win, k_name="k_win", v_name="v_win")
  if v_win.shape[3] != v.shape[3]:
    raise ValueError(f"{v_win.shape=} and {v.shape=} disagree on Dv")
  validation.check_attention(q, k_cmp, v_cmp, k_name="k_cmp", v_name="v_cmp",
                             same_length=False)
  if v_cmp.shape[3] != v.shape[3]:
    raise ValueError(f"{v_cmp.shape=} and {v.shape=} disagree on Dv")
  validation.check_compressed(q, k_cmp, config.cmp_block, config.cmp_stride)
  validation.check_segment_ids(segment_ids, q)
  branches = resolve_nsa(impl, config, q, k, v, k_cmp, v_cmp, k_win=k_win,
                         v_win=v_win, scale=scale, segment_ids=segment_ids)
  if _empty(q):
    return jnp.zeros((*q.shape[:3], v.shape[3]), q.dtype)
  fns = tuple(branches[op].fn for op in (
      "compressed_attention", "select_blocks", "selected_attention",
      "sliding_window_attention")) if branches else None
  return _run_nsa(fns, config, _scale(q, scale), q, k, v, gates, k_cmp,
                  v_cmp, k_win, v_win, segment_ids)


def _nsa(fns, config, scale, q, k, v, gates, k_cmp, v_cmp, k_win, v_win,
         segment_ids):
  """The three branches on already validated, resolved inputs (traced)."""
  if fns is None:
    return reference.nsa_attention_reference(
        q, k, v, gates, config, k_cmp=k_cmp, v_cmp=v_cmp, k_win=k_win,
        v_win=v_win, scale=scale, segment_ids=segment_ids)
  cmp_fn, select_fn, slc_fn, win_fn = fns
  seg = _optional(segment_ids)
  o_cmp, lse = cmp_fn(q, k_cmp, v_cmp, block_size=config.cmp_block,
                      stride=config.cmp_stride, scale=scale, **seg)
  indices = select_fn(*jax.lax.stop_gradient((q, k_cmp, lse)), config=config,
                      scale=scale, **seg)
  o_slc = slc_fn(q, k, v, indices, block_size=config.sel_block, scale=scale,
                 **seg)
  o_win = win_fn(q, k_win, v_win, window=config.window, scale=scale, **seg)
  return combine_branches(gates, o_cmp, o_slc, o_win)


_run_nsa = jax.jit(_nsa, static_argnums=(0, 1, 2))


def combine_branches(gates, o_cmp, o_slc, o_win):
  """o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, summed in float32.

  Args:
    gates: [B, T, Hq, 3]; o_*: [B, T, Hq, Dv].

  Returns:
    [B, T, Hq, Dv] in o_cmp.dtype.
  """
  acc = jnp.promote_types(o_cmp.dtype, jnp.float32)
  g = gates.astype(acc)[..., None]  # [B, T, Hq, 3, 1]
  # Three products, not a stack: a stacked [B, T, Hq, 3, Dv] copy of the
  # branch outputs would be written in the forward and kept for the gates'
  # gradient, where the branch outputs themselves serve.
  out = g[..., 0, :] * o_cmp.astype(acc)
  out = out + g[..., 1, :] * o_slc.astype(acc)
  out = out + g[..., 2, :] * o_win.astype(acc)
  return out.astype(o_cmp.dtype)
