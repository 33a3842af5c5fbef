"""The Pallas Triton kernels (``pallas_kernels``) as implementations of ops.

On a GPU they compile to Triton; elsewhere they run in interpret mode, which
is how the CPU tests exercise them ("auto" offers them on GPUs only).
Segment ids reach the kernels as document starts (``nsa_jax.segments``), an
extra kernel input only when given; so does a query offset (``q_offset``,
context parallelism) of the compressed and selected kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import segments

# Dtypes the kernels are written and tested for (float32 dots at full
# precision); float64 goes to the xla path.
DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
MIN_BLOCK = 16  # plgpu.dot's smallest matmul dimension


def _kernels():
  import pallas_kernels  # pylint: disable=g-import-not-at-top
  return pallas_kernels


def _dtype_reason(*arrays):
  dtypes = {jnp.dtype(x.dtype) for x in arrays}
  if len(dtypes) > 1:
    return (f"the kernels take one input dtype, got "
            f"{sorted(str(d) for d in dtypes)}")
  dtype = dtypes.pop()
  if dtype not in {jnp.dtype(d) for d in DTYPES}:
    return (f"the kernels take float16, bfloat16 or float32, got {dtype} "
            "(impl='xla' serves float64)")
  return None


def _x64_reason():
  """The compressed and block-score kernels still mix int32 and int64 there."""
  if jax.config.jax_enable_x64:
    return ("the compressed and block-score kernels do not run with "
            "JAX_ENABLE_X64 yet (impl='xla' does)")
  return None


def supports_compressed(q, k_cmp, v_cmp, **static):
  del static
  return _dtype_reason(q, k_cmp, v_cmp) or _x64_reason()


def compressed_attention(q, k_cmp, v_cmp, *, block_size, stride, scale,
                         segment_ids=None, q_offset=0):
  segments.check_whole_sequence(segment_ids, q_offset)
  return _kernels().compressed_attention(
      q, k_cmp, v_cmp, block_size=block_size, stride=stride, scale=scale,
      doc_starts=segments.starts_or_none(segment_ids), q_offset=q_offset)


def supports_select(q, k_cmp, lse, *, config, **static):
  """Block scores and block selection share the score kernel's rules."""
  del lse, static
  if not _kernels().supports_selection(config):
    return (f"the block-score kernel needs sel_block / cmp_stride a power of "
            f"two, got {config.sel_block} / {config.cmp_stride}")
  return _dtype_reason(q, k_cmp) or _x64_reason()


def block_scores(q, k_cmp, lse, *, config, scale, segment_ids=None):
  return _kernels().block_scores(
      q, k_cmp, lse, cmp_block=config.cmp_block,
      cmp_stride=config.cmp_stride, sel_block=config.sel_block, scale=scale,
      doc_starts=segments.starts_or_none(segment_ids))


def select_blocks(q, k_cmp, lse, *, config, scale, segment_ids=None):
  return _kernels().select_blocks(
      q, k_cmp, lse, cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
      sel_block=config.sel_block, num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local,
      scale=scale, doc_starts=segments.starts_or_none(segment_ids))


def block_size_reason(block_size: int):
  """Why the selected kernel cannot take l' (None if it can)."""
  if not _kernels().supports_block_size(block_size):
    return (f"the selected kernel needs block_size (l') a power of two >= "
            f"{MIN_BLOCK}, got {block_size}")
  return None


def _scale_reason(scale):
  if scale is not None and not scale > 0:
    return f"the selected and window kernels need scale > 0, got {scale}"
  return None


def supports_selected(q, k, v, block_indices, *, block_size, scale=None,
                      **static):
  del block_indices, static
  return (_dtype_reason(q, k, v) or block_size_reason(block_size)
          or _scale_reason(scale))


def selected_attention(q, k, v, block_indices, *, block_size, scale,
                       segment_ids=None, q_offset=0):
  segments.check_whole_sequence(segment_ids, q_offset)
  return _kernels().selected_attention(
      q, k, v, block_indices, block_size=block_size, scale=scale,
      doc_starts=segments.starts_or_none(segment_ids), q_offset=q_offset)


def supports_window(q, k, v, *, scale=None, **static):
  del static
  return _dtype_reason(q, k, v) or _scale_reason(scale)


def sliding_window_attention(q, k, v, *, window, scale, segment_ids=None):
  return _kernels().sliding_window_attention(
      q, k, v, window=window, scale=scale,
      doc_starts=segments.starts_or_none(segment_ids))
