"""NSA branch 3: causal sliding-window attention on the selected kernel."""

from __future__ import annotations

import warnings

import jax.numpy as jnp

from pallas_kernels import triton_compat as tc
from pallas_kernels.selected_attention import selected_attention

# Largest key block the window uses.
_MAX_WINDOW_BLOCK = 64


def window_block_table(seq_len: int, window: int, block_size: int,
                       doc_starts=None):
  """Block table of the window: blocks holding keys t - w < s <= t.

  Args:
    seq_len: T.
    window: w.
    block_size: key block size of the table.
    doc_starts: optional int32 [B, T]: keys also need s >= doc_starts[t], so
      the table starts at the block of the later bound.

  Returns:
    int32 [T, nw] (static), or [B, T, nw] with ``doc_starts``; nw =
    min(ceil((w - 1) / bs) + 1, ceil(T / bs)): blocks first(t) .. t // bs
    with first(t) = max(0, t - w + 1, doc_starts[t]) // bs, -1 padded.
  """
  num_slots = min(-(-(window - 1) // block_size) + 1, -(-seq_len // block_size))
  t = jnp.arange(seq_len, dtype=jnp.int32)[:, None]
  lower = jnp.maximum(t - window + 1, 0)
  if doc_starts is not None:
    t = t[None]
    lower = jnp.maximum(lower[None], doc_starts.astype(jnp.int32)[..., None])
  blk = lower // block_size + jnp.arange(num_slots, dtype=jnp.int32)
  return jnp.where(blk <= t // block_size, blk, -1)


def sliding_window_attention(q, k, v, *, window: int,
                             scale: float | None = None,
                             interpret: bool | None = None,
                             block_size: int | None = None,
                             block_q: int | None = None,
                             block_q_dkv: int | None = None,
                             num_warps: int | None = None,
                             num_stages: int | None = None,
                             implementation: str | None = None,
                             block_k: int | None = None,
                             doc_starts=None):
  """Causal sliding-window attention: query t sees keys t - w < s <= t.

  Reuses the selected-attention kernel with a static block table (the key
  blocks overlapping the window of each position) and its ``window``
  lower-bound mask, forward and backward; any Dk, Dv, dtype and T. cuDNN's
  fused window (faster where it serves) is a separate implementation of
  ``nsa_jax.ops.sliding_window_attention`` (``impl="cudnn"``).

  Args:
    q: [B, T, Hq, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv].
    window: w >= 1.
    scale: softmax scale, defaults to 1/sqrt(Dk).
    interpret: run in Pallas interpret mode; None means "when no GPU".
    block_size: key block (power of two >= 16); None: next_pow2(w) clipped
      to [16, 64].
    block_q, block_q_dkv, num_warps, num_stages: launch settings of the
      selected-attention kernel; None: from its launch table.
    implementation: deprecated; only "pallas" (or None) is served here.
    block_k: deprecated name of ``block_q_dkv``.
    doc_starts: optional int32 [B, T], non-decreasing, ``<= t``: keys also
      need ``s >= doc_starts[t]`` (packed documents); blocks before it are
      left out of the table.

  Returns:
    [B, T, Hq, Dv] in q.dtype.

  Raises:
    ValueError: for a bad window or implementation.
  """
  if window < 1:
    raise ValueError(f"{window=} must be >= 1")
  if implementation is not None:
    if implementation != "pallas":
      raise ValueError(
          f"{implementation=}: pallas_kernels serves only 'pallas'; cuDNN's "
          "window is nsa_jax.ops.sliding_window_attention(impl='cudnn')")
    warnings.warn("sliding_window_attention(implementation=...) is "
                  "deprecated: this function is the Pallas path; choose "
                  "with nsa_jax.ops.sliding_window_attention(impl=...)",
                  DeprecationWarning, stacklevel=2)
  batch, seq_len, num_kv_heads = k.shape[:3]
  if block_size is None:
    block_size = min(max(tc.next_pow2(window), tc.MIN_DOT_DIM),
                     _MAX_WINDOW_BLOCK)
  table = window_block_table(seq_len, window, block_size, doc_starts)
  table = jnp.broadcast_to(table[..., None, :] if doc_starts is not None
                           else table[None, :, None, :],
                           (batch, seq_len, num_kv_heads, table.shape[-1]))
  return selected_attention(
      q, k, v, table, block_size=block_size, scale=scale, window=window,
      interpret=interpret, block_q=block_q, block_q_dkv=block_q_dkv,
      num_warps=num_warps, num_stages=num_stages, block_k=block_k,
      doc_starts=doc_starts)
