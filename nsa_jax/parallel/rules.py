"""Logical-axis rules: which mesh axes split each parameter and batch.

Two tables, as in MaxText and t5x:
  ``PARAM_AXES``  parameter path (a regular expression searched in
                  "layers/0/attn/q_proj/kernel") -> one logical axis name per
                  dimension; the first rule that matches wins, a parameter
                  no rule names is replicated (norm scales, biases, the
                  compression MLPs: small).
  ``MESH_AXES``   logical axis -> mesh axes (``nsa_jax.parallel.mesh``).

The modules need no annotations: the rules read the state's paths, and the
optimizer's moments (".../opt_state/0/mu/layers/0/attn/q_proj/kernel")
match the rule of their parameter, so they are split the same way (ZeRO).
A dimension a rule would split must divide by the size of its mesh axes;
a parameter that does not raises ValueError naming it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

from flax import nnx
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nsa_jax.parallel.mesh import axis_size

# Logical axis -> mesh axes; None replicates.
MESH_AXES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": ("sequence",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
}

# Parameter path pattern -> logical axes of its dimensions (first match).
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"attn/q_proj/kernel$", ("embed", "heads")),
    (r"attn/[kv]_proj(/\w+)?/kernel$", ("embed", "kv_heads")),
    (r"attn/out_proj/kernel$", ("heads", "embed")),
    (r"attn/gate_proj/kernel$", (None, "heads")),
    (r"attn/gate_proj/bias$", ("heads",)),
    (r"mlp/(gate|up)/kernel$", ("embed", "mlp")),
    (r"mlp/down/kernel$", ("mlp", "embed")),
)


def path_name(path: Sequence[Any]) -> str:
  """"layers/0/attn/q_proj/kernel" for a pytree key path of an NNX state."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
  return "/".join(parts)


def logical_axes(name: str, ndim: int) -> tuple[str | None, ...]:
  """Logical axes of the parameter (or optimizer moment) at ``name``."""
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, name) and len(axes) == ndim:
      return axes
  return (None,) * ndim


def mesh_spec(axes: Sequence[str | None], mesh: jax.sharding.Mesh) -> P:
  """The PartitionSpec of logical ``axes`` on ``mesh``.

  Mesh axes of size 1 are left out, so a spec names only real splits.
  """
  entries = []
  for axis in axes:
    names = tuple(n for n in (MESH_AXES.get(axis) or ())
                  if axis_size(mesh, n) > 1)
    entries.append(names[0] if len(names) == 1 else (names or None))
  return P(*entries)


def split_size(entry, mesh: jax.sharding.Mesh) -> int:
  """How many pieces one PartitionSpec entry cuts its dimension into."""
  names = (entry,) if isinstance(entry, str) else (entry or ())
  return math.prod(axis_size(mesh, n) for n in names)


def state_shardings(state, mesh: jax.sharding.Mesh):
  """NamedSharding per leaf of an NNX state (model or optimizer).

  Args:
    state: ``nnx.state(model)`` or ``nnx.state(optimizer)`` (arrays or
      ``jax.ShapeDtypeStruct``).
    mesh: the device mesh.

  Returns:
    The same tree of ``NamedSharding``.

  Raises:
    ValueError: a dimension the rules split does not divide by its axes.
  """
  def one(path, x):
    name = path_name(path)
    spec = mesh_spec(logical_axes(name, len(x.shape)), mesh)
    for dim, entry in zip(x.shape, spec):
      if dim % split_size(entry, mesh):
        raise ValueError(
            f"{name} {list(x.shape)}: dimension {dim} does not split over "
            f"mesh axes {entry} of size {split_size(entry, mesh)}; change "
            "the mesh or the model width")
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, state)


def shard_state(node: nnx.Module | nnx.Optimizer,
                mesh: jax.sharding.Mesh) -> None:
  """Moves ``node``'s state onto ``mesh`` by the rules, in place."""
  state = nnx.state(node)
  nnx.update(node, jax.device_put(state, state_shardings(state, mesh)))


def batch_spec(mesh: jax.sharding.Mesh) -> P:
  """[B, T] token batches: batch over data and fsdp, T over sequence."""
  return mesh_spec(("batch", "seq"), mesh)
