"""The learnable compression function phi of NSA's first branch."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from nsa_jax.compression import extract_blocks

COMPRESSIONS = ("mlp", "mean")


class BlockCompressor(nnx.Module):
  """phi: overlapping blocks of keys (or values) -> one token per block.

  ``"mlp"`` (the paper's choice): add a learnable intra-block position
  embedding ``[l, D]``, flatten the block to ``l * D`` and apply
  ``Linear(l*D -> hidden) -> SiLU -> Linear(hidden -> D)``; shared by all
  heads. ``"mean"``: average the block (no parameters).
  """

  def __init__(self, head_dim: int, *, block_size: int, stride: int,
               kind: str = "mlp", hidden: int | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    """Args:
      head_dim: D of the tokens compressed.
      block_size: l. stride: d.
      kind: "mlp" or "mean".
      hidden: MLP width, default 4 * head_dim.
      dtype: compute dtype; param_dtype: parameter dtype.
      rngs: parameter initialisation.
    """
    if kind not in COMPRESSIONS:
      raise ValueError(f"compression kind={kind!r} is not one of "
                       f"{COMPRESSIONS}")
    self.kind = kind
    self.block_size = block_size
    self.stride = stride
    if kind == "mlp":
      hidden = hidden or 4 * head_dim
      init = nnx.initializers.normal(0.02)
      self.position = nnx.Param(
          init(rngs.params(), (block_size, head_dim), param_dtype))
      self.fc1 = nnx.Linear(block_size * head_dim, hidden, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
      self.fc2 = nnx.Linear(hidden, head_dim, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    """Args: x [B, T, H, D]. Returns: [B, Tc, H, D], Tc = (T - l) // d + 1."""
    blocks = extract_blocks(x, self.block_size, self.stride)  # [B,Tc,l,H,D]
    if self.kind == "mean":
      return blocks.mean(axis=2)
    blocks = blocks + self.position[...][None, None, :, None, :].astype(
        blocks.dtype)
    b, tc, l, h, d = blocks.shape
    flat = blocks.transpose(0, 1, 3, 2, 4).reshape(b, tc, h, l * d)
    return self.fc2(jax.nn.silu(self.fc1(flat))).astype(x.dtype)
