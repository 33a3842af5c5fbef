"""Command-line flags that choose devices: mesh, context parallelism, hosts.

  --mesh-data/--mesh-fsdp/--mesh-tensor/--mesh-sequence N
      a sharded run over all devices (sizes multiply to the device count;
      one may be -1). None given: one device, as before.
  --context-parallel allgather|gather|heads, --cp-capacity N
      how NSA crosses a split sequence (nsa_jax.parallel.attention).
  --distributed [--coordinator-address A --num-processes N --process-id I]
      one process per host: ``jax.distributed.initialize`` first (without
      the three, jax reads them from the cluster: SLURM, Open MPI, ...).

``resolve`` checks what the flags alone decide (exit 2 through the
parser); ``ScaleOut.parallelism`` checks the mesh against the devices and
the model once jax is up.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax

from nsa_jax.parallel.attention import ContextParallel
from nsa_jax.parallel.attention import STRATEGIES
from nsa_jax.parallel.mesh import AXES
from nsa_jax.parallel.mesh import MeshConfig

_HOST_FLAGS = ("coordinator_address", "num_processes", "process_id")


@dataclasses.dataclass(frozen=True)
class ScaleOut:
  """What the device flags asked for.

  Attributes:
    mesh: the mesh sizes, or None (one device, no sharding).
    context: NSA's strategy across the sequence axis.
    distributed: call ``jax.distributed.initialize`` first.
    hosts: its explicit arguments (coordinator_address, num_processes,
      process_id), empty to let jax detect them.
  """

  mesh: MeshConfig | None = None
  context: ContextParallel = ContextParallel()
  distributed: bool = False
  hosts: tuple[tuple[str, object], ...] = ()

  def initialize(self) -> None:
    """Joins the other processes (before anything asks jax for devices)."""
    if self.distributed:
      jax.distributed.initialize(**dict(self.hosts))

  def parallelism(self, *, batch_size: int, seq_len: int, num_heads: int,
                  num_kv_heads: int):
    """The ``Parallelism`` of this mesh, or None without one.

    Raises:
      ValueError: a mesh that does not fit the devices, batch (the micro-
        batch), sequence or heads, or a strategy that does not fit it.
    """
    if self.mesh is None:
      return None
    from nsa_jax.parallel.train import Parallelism  # pylint: disable=g-import-not-at-top
    mesh = self.mesh.make()
    sequence = dict(mesh.shape)["sequence"]
    if sequence == 1 and self.context != ContextParallel():
      raise ValueError("--context-parallel and --cp-capacity need a split "
                       "sequence (--mesh-sequence > 1)")
    parallel = Parallelism(mesh, self.context)
    parallel.check(batch_size=batch_size, seq_len=seq_len,
                   num_heads=num_heads, num_kv_heads=num_kv_heads)
    return parallel


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Adds the "devices" group of flags."""
  group = parser.add_argument_group("devices (nsa_jax.parallel)")
  for axis in AXES:
    group.add_argument(f"--mesh-{axis}", type=int, default=None,
                       metavar="N", help=f"size of the mesh's {axis} axis "
                       "(default: 1; no --mesh-* flag: one device)")
  group.add_argument("--context-parallel", choices=STRATEGIES, default=None,
                     help="NSA across a split sequence (default: "
                     f"{ContextParallel().strategy})")
  group.add_argument("--cp-capacity", type=int, default=None, metavar="N",
                     help="--context-parallel gather: remote blocks per "
                     "(source shard, row, kv head) before it falls back to "
                     f"allgather (default: {ContextParallel().capacity})")
  group.add_argument("--distributed", action="store_true",
                     help="one process per host: jax.distributed.initialize")
  group.add_argument("--coordinator-address", default=None,
                     help="host:port of process 0 (with --distributed)")
  group.add_argument("--num-processes", type=int, default=None,
                     help="processes in the run (with --distributed)")
  group.add_argument("--process-id", type=int, default=None,
                     help="this process's rank (with --distributed)")


def resolve(args: argparse.Namespace,
            parser: argparse.ArgumentParser) -> ScaleOut:
  """The ScaleOut of parsed flags; contradictory ones exit(2)."""
  sizes = {axis: getattr(args, f"mesh_{axis}") for axis in AXES}
  given = {a: s for a, s in sizes.items() if s is not None}
  hosts = tuple((n, getattr(args, n)) for n in _HOST_FLAGS
                if getattr(args, n) is not None)
  if hosts and not args.distributed:
    parser.error(f"--{hosts[0][0].replace('_', '-')} needs --distributed")
  if args.cp_capacity is not None and args.context_parallel != "gather":
    parser.error("--cp-capacity applies to --context-parallel gather")
  if not given and (args.context_parallel or args.cp_capacity):
    parser.error("--context-parallel needs a mesh with a sequence axis "
                 "(--mesh-sequence)")
  try:
    mesh = MeshConfig(**given) if given else None
    context = ContextParallel(
        strategy=args.context_parallel or ContextParallel().strategy,
        capacity=(ContextParallel().capacity if args.cp_capacity is None
                  else args.cp_capacity))
  except ValueError as e:
    parser.error(str(e))
  return ScaleOut(mesh=mesh, context=context, distributed=args.distributed,
                  hosts=hosts)
