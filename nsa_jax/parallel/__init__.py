"""Scale-out: device meshes, sharding rules, sharded NSA and training.

  mesh       MeshConfig: data x fsdp x tensor x sequence, from flags
  rules      logical-axis rules for parameters, optimizer state, batches
  attention  NSA over a mesh (context parallelism), and ``activate``
  train      Parallelism: sharded model, optimizer, batches and steps
  comm       bytes each context-parallel strategy moves, and the HLO's
"""

from nsa_jax.parallel.attention import activate
from nsa_jax.parallel.attention import ContextParallel
from nsa_jax.parallel.attention import nsa_attention
from nsa_jax.parallel.attention import sharded_nsa_attention
from nsa_jax.parallel.attention import STRATEGIES
from nsa_jax.parallel.mesh import AXES
from nsa_jax.parallel.mesh import MeshConfig


def __getattr__(name):
  # Parallelism imports nsa_jax.train, which imports the modules, which
  # import parallel.attention: load it on first use, not with the package.
  if name == "Parallelism":
    from nsa_jax.parallel.train import Parallelism  # pylint: disable=g-import-not-at-top
    return Parallelism
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
