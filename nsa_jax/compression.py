"""The overlapping blocks of a sequence that compressed tokens summarise."""

from __future__ import annotations

import jax.numpy as jnp


def extract_blocks(x, block_size: int, stride: int):
  """Overlapping blocks ``[i*d, i*d + l)`` of the sequence axis.

  Built from ``l / d`` shifted views of stride-sized chunks, so no gather.

  Args:
    x: [B, T, H, D].
    block_size: l, a multiple of ``stride``.
    stride: d.

  Returns:
    [B, Tc, l, H, D] with Tc = max(0, (T - l) // d + 1).
  """
  b, seq_len, h, dim = x.shape
  if block_size % stride:
    raise ValueError(f"{block_size=} must be a multiple of {stride=}")
  tc = max(0, (seq_len - block_size) // stride + 1)
  if tc == 0:
    return jnp.zeros((b, 0, block_size, h, dim), x.dtype)
  per_block = block_size // stride
  used = (tc + per_block - 1) * stride
  chunks = x[:, :used].reshape(b, tc + per_block - 1, stride, h, dim)
  blocks = jnp.stack([chunks[:, n:n + tc] for n in range(per_block)], axis=2)
  return blocks.reshape(b, tc, block_size, h, dim)
