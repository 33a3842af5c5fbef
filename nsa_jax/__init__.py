"""nsa-jax: Native Sparse Attention in JAX, Flax NNX and Pallas."""

from nsa_jax import ops
from nsa_jax.config import NSAConfig

__all__ = ["NSAConfig", "ops"]
__version__ = "0.1.0"
