"""``shard_map`` on every jax this project supports (0.10.2 to 0.12).

``jax.shard_map`` (public since jax 0.7, ``check_vma``) is used where it
exists; older wheels only have ``jax.experimental.shard_map`` (``check_rep``).
Both are called with the replication check off: Pallas calls inside carry no
replication rule, and every output here is sharded along its mesh axes.
"""

from __future__ import annotations

import jax


def shard_map(fn, *, mesh, in_specs, out_specs):
  """``fn`` mapped over the shards of ``mesh`` (see ``jax.shard_map``)."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)
  from jax.experimental import shard_map as legacy  # pylint: disable=g-import-not-at-top
  return legacy.shard_map(fn, mesh=mesh, in_specs=in_specs,
                          out_specs=out_specs, check_rep=False)
