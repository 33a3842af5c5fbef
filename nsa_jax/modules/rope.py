"""Rotary position embedding (RoPE), rotate-half convention."""

from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x, positions, base: float = 10000.0):
  """Rotates channel pairs (i, i + D/2) of ``x`` by position-dependent angles.

  Args:
    x: [B, T, H, D] with D even.
    positions: int [T] or [B, T], absolute token positions.
    base: wavelength base.

  Returns:
    [B, T, H, D] in x.dtype.
  """
  dim = x.shape[-1]
  if dim % 2:
    raise ValueError(f"RoPE needs an even head dim, got {x.shape=}")
  half = dim // 2
  acc = jnp.promote_types(x.dtype, jnp.float32)  # float64 stays float64
  freq = base ** (-jnp.arange(half, dtype=acc) / half)  # [D/2]
  pos = jnp.asarray(positions, acc)
  pos = jnp.broadcast_to(pos, x.shape[:2])
  angle = pos[..., None, None] * freq  # [B, T, 1, D/2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1 = x[..., :half].astype(acc)
  x2 = x[..., half:].astype(acc)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
