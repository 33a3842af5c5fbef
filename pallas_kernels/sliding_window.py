"""NSA branch 3: causal sliding-window attention (cuDNN or Pallas Triton)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import triton_compat as tc
from pallas_kernels.selected_attention import selected_attention

# Largest key block the Pallas path uses for the window.
_MAX_WINDOW_BLOCK = 64


def cudnn_supported(q, k, v) -> bool:
  """Whether cuDNN's fused attention serves this call on the current backend.

  Conservative: GPU backend, bf16/fp16, Dk == Dv, head dim a multiple of 8 and
  at most 128.
  """
  return (jax.default_backend() == "gpu"
          and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.dtype == k.dtype == v.dtype
          and q.shape[-1] == k.shape[-1] == v.shape[-1]
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def window_block_table(seq_len: int, window: int, block_size: int):
  """Static block table of the window: blocks holding keys t - w < s <= t.

  Args:
    seq_len: T.
    window: w.
    block_size: key block size of the table.

  Returns:
    int32 [T, nw], nw = min(ceil((w - 1) / bs) + 1, ceil(T / bs)): blocks
    first(t) .. t // bs with first(t) = max(0, t - w + 1) // bs, -1 padded.
  """
  num_slots = min(-(-(window - 1) // block_size) + 1, -(-seq_len // block_size))
  t = jnp.arange(seq_len, dtype=jnp.int32)[:, None]
  first = jnp.maximum(t - window + 1, 0) // block_size
  blk = first + jnp.arange(num_slots, dtype=jnp.int32)[None, :]
  return jnp.where(blk <= t // block_size, blk, -1)


def sliding_window_attention(q, k, v, *, window: int,
                             scale: float | None = None,
                             interpret: bool | None = None,
                             implementation: str | None = None,
                             block_size: int | None = None,
                             block_q: int | None = None,
                             block_k: int | None = None,
                             num_warps: int | None = None,
                             num_stages: int | None = None):
  """Causal sliding-window attention: query t sees keys t - w < s <= t.

  The window is dense local attention, which cuDNN's fused attention already
  does well; where it serves (``cudnn_supported``: GPU, bf16/fp16, Dk == Dv
  <= 128) this calls ``jax.nn.dot_product_attention(implementation="cudnn",
  local_window_size=(w - 1, 0))``. Elsewhere (Dk != Dv as in the paper's
  192/128 heads, fp32, CPU, interpret mode) it reuses the selected-attention
  kernel with a static block table (the key blocks overlapping the window of
  each position) and its ``window`` lower-bound mask, forward and backward.

  Args:
    q: [B, T, Hq, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv].
    window: w >= 1.
    scale: softmax scale, defaults to 1/sqrt(Dk).
    interpret: run the Pallas path in interpret mode; None means "when no
      GPU". True forces the Pallas path.
    implementation: "cudnn", "pallas" or None (pick as described above).
    block_size: key block of the Pallas path (power of two >= 16); None:
      next_pow2(w) clipped to [16, 64].
    block_q, block_k, num_warps, num_stages: launch settings of the
      selected-attention kernel; None: from its launch table.

  Returns:
    [B, T, Hq, Dv] in q.dtype.

  Raises:
    ValueError: for an unknown implementation or a bad window.
  """
  if window < 1:
    raise ValueError(f"{window=} must be >= 1")
  if implementation is None:
    use_cudnn = not interpret and cudnn_supported(q, k, v)
    implementation = "cudnn" if use_cudnn else "pallas"
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True,
        local_window_size=(window - 1, 0), implementation="cudnn")
  if implementation != "pallas":
    raise ValueError(f"{implementation=} must be 'cudnn', 'pallas' or None")
  batch, seq_len, num_kv_heads = k.shape[:3]
  if block_size is None:
    block_size = min(max(tc.next_pow2(window), tc.MIN_DOT_DIM),
                     _MAX_WINDOW_BLOCK)
  table = window_block_table(seq_len, window, block_size)
  table = jnp.broadcast_to(table[None, :, None, :],
                           (batch, seq_len, num_kv_heads, table.shape[-1]))
  return selected_attention(
      q, k, v, table, block_size=block_size, scale=scale, window=window,
      interpret=interpret, block_q=block_q, block_k=block_k,
      num_warps=num_warps, num_stages=num_stages)
