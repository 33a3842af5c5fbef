"""The functional NSA API (docs/SEMANTICS.md): one dispatcher per ``impl``.

``impl`` is one of:
  "reference"  dense, masked, float32 (``nsa_jax.reference``): the oracle.
  "xla"        chunked, never ``T x T`` (``nsa_jax.xla``): CPU/TPU and fallback.
  "pallas"     Pallas Triton kernels (``pallas_kernels``); interpret mode when
               no GPU is present, which is how the CPU tests run them.
  "auto"       "pallas" on a GPU, "xla" elsewhere.
Inputs are checked before tracing; a bad one raises ValueError or TypeError
naming the argument.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

from nsa_jax import reference
from nsa_jax import selection
from nsa_jax import validation
from nsa_jax import xla
from nsa_jax.config import NSAConfig


def resolve_impl(impl: str) -> str:
  """Maps "auto" to "pallas" on a GPU backend and to "xla" elsewhere."""
  validation.check_impl(impl)
  if impl != "auto":
    return impl
  return "pallas" if jax.default_backend() == "gpu" else "xla"


def _resolve_selected(impl, block_size):
  """Like resolve_impl; "auto" falls back to "xla" for an l' the kernel lacks.

  The selected-attention kernel needs l' to be a power of two >= 16; an
  explicit "pallas" with another l' raises the kernel's ValueError.
  """
  resolved = resolve_impl(impl)
  if (impl == "auto" and resolved == "pallas"
      and not _kernels().supports_block_size(block_size)):
    return "xla"
  return resolved


def _scale(q, scale):
  return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _checked_jit(*static_argnames):
  """jax.jit with ``static_argnames``, after checking those arguments.

  ``config`` must be an NSAConfig, ``impl`` a known name, and every static
  argument hashable, so a bad one gets a readable error instead of jit's.
  """
  def wrap(fn):
    jitted = jax.jit(fn, static_argnames=static_argnames)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      for name in static_argnames:
        value = bound.arguments.get(name)
        if name == "config":
          validation.check_config(value)
        elif name == "impl" and value is not None:
          validation.check_impl(value)
        try:
          hash(value)
        except TypeError:
          raise TypeError(f"{fn.__name__}: {name}={value!r} must be "
                          "hashable (it is a static argument)") from None
      return jitted(*args, **kwargs)
    return call
  return wrap


def _kernels():
  import pallas_kernels  # pylint: disable=g-import-not-at-top
  return pallas_kernels


@_checked_jit("block_size", "stride", "scale", "impl")
def compressed_attention(q, k_cmp, v_cmp, *, block_size, stride, scale=None,
                         impl="auto"):
  """Branch 1: attention over compressed tokens whose block is in the past.

  Args:
    q: [B, T, Hq, Dk] queries.
    k_cmp: [B, Tc, Hkv, Dk] compressed keys, Tc = max(0, (T - l) // d + 1).
    v_cmp: [B, Tc, Hkv, Dv] compressed values.
    block_size: l, raw tokens per compressed token.
    stride: d, distance between compressed blocks.
    scale: softmax scale, default 1/sqrt(Dk).
    impl: "auto", "pallas", "xla" or "reference".

  Returns:
    (out [B, T, Hq, Dv] in q.dtype, lse [B, T, Hq] float32; float64 for
    float64 inputs on the xla/reference paths). A query with no visible
    compressed token (t < l - 1) gets out = 0 and lse = -inf.

  Raises:
    ValueError, TypeError: shapes, dtypes or impl that do not fit.
  """
  impl = resolve_impl(impl)
  validation.check_attention(q, k_cmp, v_cmp, k_name="k_cmp", v_name="v_cmp",
                             same_length=False)
  validation.check_compressed(q, k_cmp, block_size, stride)
  scale = _scale(q, scale)
  if impl == "reference":
    return reference.compressed_attention_reference(
        q, k_cmp, v_cmp, block_size=block_size, stride=stride, scale=scale)
  if impl == "pallas":
    return _kernels().compressed_attention(
        q, k_cmp, v_cmp, block_size=block_size, stride=stride, scale=scale)
  return xla.compressed_attention(q, k_cmp, v_cmp, block_size=block_size,
                                  stride=stride, scale=scale)


@_checked_jit("config", "scale", "impl")
def block_scores(q, k_cmp, lse, config: NSAConfig, *, scale=None, impl="auto"):
  """Group-summed selection-block importance P (spec, branch 2).

  Args:
    q: [B, T, Hq, Dk]; k_cmp: [B, Tc, Hkv, Dk]; lse: float32 [B, T, Hq], the
      log-sum-exp returned by ``compressed_attention``.
    config: block sizes.
    scale: the scale used for ``lse``.
    impl: "auto", "pallas", "xla" or "reference".

  Returns:
    float32 [B, T, Hkv, Ts], before forcing and causal masking. Not
    differentiable (inputs are wrapped in stop_gradient).
  """
  impl = resolve_impl(impl)
  validation.check_config(config)
  validation.check_rank4(q=q, k_cmp=k_cmp)
  validation.check_float(q=q, k_cmp=k_cmp)
  validation.check_lse(lse, q)
  validation.check_compressed(q, k_cmp, config.cmp_block, config.cmp_stride)
  if q.shape[2] % k_cmp.shape[2] or q.shape[0] != k_cmp.shape[0]:
    raise ValueError(f"{q.shape=} and {k_cmp.shape=} disagree on batch or "
                     "GQA heads")
  q, k_cmp, lse = jax.lax.stop_gradient((q, k_cmp, lse))
  scale = _scale(q, scale)
  if impl == "reference":
    return reference.block_scores_reference(q, k_cmp, lse, config, scale=scale)
  if impl == "pallas":
    return _kernels().block_scores(
        q, k_cmp, lse, cmp_block=config.cmp_block,
        cmp_stride=config.cmp_stride, sel_block=config.sel_block, scale=scale)
  return selection.block_scores(q, k_cmp, lse, config, scale=scale)


def select_blocks(q, k_cmp, lse, config: NSAConfig, *, scale=None,
                  impl="auto"):
  """Top-n selection blocks per (query, kv head), shared by the GQA group.

  Args:
    q: [B, T, Hq, Dk]; k_cmp: [B, Tc, Hkv, Dk]; lse: float32 [B, T, Hq].
    config: selection settings (``num_selected``, forced blocks, sizes).
    scale: the scale used for ``lse``.
    impl: "pallas" scores and ranks on the GPU (``pallas_kernels.
      block_select``); "xla"/"reference" score in XLA and rank by top_k.

  Returns:
    int32 [B, T, Hkv, num_selected], entries in [0, Ts) or -1, no repeats.
  """
  resolved = resolve_impl(impl)
  if resolved == "pallas" and _kernels().supports_selection(config):
    validation.check_config(config)
    validation.check_rank4(q=q, k_cmp=k_cmp)
    validation.check_float(q=q, k_cmp=k_cmp)
    validation.check_lse(lse, q)
    validation.check_compressed(q, k_cmp, config.cmp_block, config.cmp_stride)
    return _pallas_select(q, k_cmp, lse, config, _scale(q, scale))
  return selection.top_n_blocks(
      block_scores(q, k_cmp, lse, config, scale=scale, impl=impl), config)


@functools.partial(jax.jit, static_argnames=("config", "scale"))
def _pallas_select(q, k_cmp, lse, config, scale):
  return _kernels().select_blocks(
      q, k_cmp, lse, cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
      sel_block=config.sel_block, num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local, scale=scale)


@_checked_jit("block_size", "scale", "impl")
def selected_attention(q, k, v, block_indices, *, block_size, scale=None,
                       impl="auto"):
  """Branch 2: attention over keys s <= t in the selected blocks of (t, h//G).

  Args:
    q: [B, T, Hq, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv].
    block_indices: int32 [B, T, Hkv, n], entries in [0, ceil(T / l')) or -1.
    block_size: l', raw tokens per selection block.
    scale: softmax scale, default 1/sqrt(Dk).
    impl: "auto", "pallas", "xla" or "reference".

  Returns:
    [B, T, Hq, Dv] in q.dtype; 0 for a query whose slots are all -1.
  """
  validation.check_attention(q, k, v)
  validation.check_block_indices(block_indices, q, k)
  validation.check_positive_int(block_size=block_size)
  impl = _resolve_selected(impl, block_size)
  block_indices = block_indices.astype(jnp.int32)
  scale = _scale(q, scale)
  if impl == "reference":
    return reference.selected_attention_reference(
        q, k, v, block_indices, block_size=block_size, scale=scale)
  if impl == "pallas":
    return _kernels().selected_attention(
        q, k, v, block_indices, block_size=block_size, scale=scale)
  return xla.selected_attention(q, k, v, block_indices, block_size=block_size,
                                scale=scale)


@_checked_jit("window", "scale", "impl")
def sliding_window_attention(q, k, v, *, window, scale=None, impl="auto"):
  """Branch 3: query t attends to keys t - w < s <= t.

  Args:
    q: [B, T, Hq, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv].
    window: w >= 1.
    scale: softmax scale, default 1/sqrt(Dk).
    impl: "auto", "pallas", "xla" or "reference".

  Returns:
    [B, T, Hq, Dv] in q.dtype.
  """
  impl = resolve_impl(impl)
  validation.check_attention(q, k, v)
  validation.check_positive_int(window=window)
  scale = _scale(q, scale)
  if impl == "reference":
    return reference.sliding_window_attention_reference(
        q, k, v, window=window, scale=scale)
  if impl == "pallas":
    return _kernels().sliding_window_attention(q, k, v, window=window,
                                               scale=scale)
  return xla.sliding_window_attention(q, k, v, window=window, scale=scale)


@_checked_jit("config", "scale", "impl")
def nsa_attention(q, k, v, gates, config: NSAConfig, *, k_cmp, v_cmp,
                  k_win=None, v_win=None, scale=None, impl="auto"):
  """Native Sparse Attention: gated sum of compressed, selected and window.

  Args:
    q: [B, T, Hq, Dk] queries.
    k, v: [B, T, Hkv, Dk], [B, T, Hkv, Dv] raw keys/values of the selection
      branch (and of the window unless ``k_win, v_win`` are given).
    gates: [B, T, Hq, 3] in [0, 1], order (cmp, slc, win).
    config: NSA hyper-parameters.
    k_cmp, v_cmp: [B, Tc, Hkv, Dk], [B, Tc, Hkv, Dv] compressed keys/values.
    k_win, v_win: optional window-branch keys/values, shaped like k, v.
    scale: softmax scale of all branches, default 1/sqrt(Dk).
    impl: "auto", "pallas", "xla" or "reference".

  Returns:
    [B, T, Hq, Dv] in q.dtype.
  """
  validation.check_config(config)
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
  if resolve_impl(impl) == "reference":
    return reference.nsa_attention_reference(
        q, k, v, gates, config, k_cmp=k_cmp, v_cmp=v_cmp, k_win=k_win,
        v_win=v_win, scale=scale)
  o_cmp, lse = compressed_attention(
      q, k_cmp, v_cmp, block_size=config.cmp_block, stride=config.cmp_stride,
      scale=scale, impl=impl)
  indices = select_blocks(q, k_cmp, lse, config, scale=scale, impl=impl)
  o_slc = selected_attention(q, k, v, indices, block_size=config.sel_block,
                             scale=scale, impl=impl)
  o_win = sliding_window_attention(q, k_win, v_win, window=config.window,
                                   scale=scale, impl=impl)
  return combine_branches(gates, o_cmp, o_slc, o_win)


def combine_branches(gates, o_cmp, o_slc, o_win):
  """o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, summed in float32.

  Args:
    gates: [B, T, Hq, 3]; o_*: [B, T, Hq, Dv].

  Returns:
    [B, T, Hq, Dv] in o_cmp.dtype.
  """
  acc = jnp.promote_types(o_cmp.dtype, jnp.float32)
  g = gates.astype(acc)[..., None]  # [B, T, Hq, 3, 1]
  stacked = jnp.stack([o_cmp, o_slc, o_win], axis=3).astype(acc)
  return (g * stacked).sum(axis=3).astype(o_cmp.dtype)
