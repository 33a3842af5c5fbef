"""Training on a mesh: where state and batches live, and the compiled steps.

``Parallelism(mesh)`` holds one mesh and one context-parallel strategy:

  create(factory)     builds a model straight into its shards (no copy of
                      the whole model on one device first)
  shard(node)         moves a model or optimizer onto the mesh by the rules
                      of ``nsa_jax.parallel.rules``
  put_batch(batch)    a host batch as global arrays split like the rules'
                      [batch, seq]; every process passes the same global
                      batch and keeps the shards of its own devices
  train_step(...)     ``nsa_jax.train.steps.train_step_fn`` compiled with
  eval_step(...)      NSA layers sharded (``attention.activate``) and the
                      updated state pinned to its shards
  train_step_fn       the same, uncompiled (``steps.SplitTrainStep`` takes
                      it)

The loop (``nsa_jax.train.loop.train(..., parallel=...)``) and orbax
checkpoints take sharded state as it is: a checkpoint restores onto the
shards of whatever mesh the restoring model lives on.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import jax
from jax.sharding import NamedSharding
import numpy as np

from nsa_jax.parallel import rules
from nsa_jax.parallel.attention import activate
from nsa_jax.parallel.attention import ContextParallel
from nsa_jax.parallel.mesh import axis_size
from nsa_jax.train import steps


class Parallelism:
  """One mesh and the strategy NSA layers use across its sequence axis.

  Args:
    mesh: the device mesh (``MeshConfig.make``).
    context: how NSA crosses the sequence split.
  """

  def __init__(self, mesh: jax.sharding.Mesh,
               context: ContextParallel = ContextParallel()):
    self.mesh, self.context = mesh, context
    self.batch_sharding = NamedSharding(mesh, rules.batch_spec(mesh))
    self.train_step_fn = self._pinned(steps.train_step_fn)
    self.train_step = nnx.jit(self.train_step_fn,
                              static_argnames=("grad_accum",))
    self.eval_step = nnx.jit(self._pinned(steps.eval_step_fn))

  def __repr__(self) -> str:
    return (f"Parallelism(mesh={dict(self.mesh.shape)}, "
            f"context={self.context})")

  @property
  def batch_split(self) -> int:
    """Shards of the batch axis (data x fsdp)."""
    return rules.split_size(rules.batch_spec(self.mesh)[0], self.mesh)

  def check(self, *, batch_size: int, seq_len: int, num_heads: int,
            num_kv_heads: int) -> None:
    """Raises ValueError, naming the flag-level cause, for a mesh that does
    not divide the batch (``batch_size`` is the micro-batch), sequence or
    heads."""
    need = {"the micro-batch (batch_size / grad_accum)":
                (batch_size, self.batch_split),
            "seq_len": (seq_len, axis_size(self.mesh, self.context.axis)),
            "num_heads": (num_heads, axis_size(self.mesh, "tensor")),
            "num_kv_heads": (num_kv_heads, axis_size(self.mesh, "tensor"))}
    for what, (size, parts) in need.items():
      if size % parts:
        raise ValueError(f"{what} = {size} does not split over the mesh "
                         f"{dict(self.mesh.shape)} ({parts} shards)")

  def _pinned(self, fn: Callable) -> Callable:
    """``fn`` traced with NSA sharded over the mesh; the state of every
    module and optimizer argument ends on its shards."""
    def run(*args, **kwargs):
      with activate(self.mesh, self.context):
        out = fn(*args, **kwargs)
      for node in args:
        if isinstance(node, (nnx.Module, nnx.Optimizer)):
          state = nnx.state(node)
          nnx.update(node, jax.lax.with_sharding_constraint(
              state, rules.state_shardings(state, self.mesh)))
      return out
    return run

  def shard(self, node: nnx.Module | nnx.Optimizer) -> None:
    """Moves ``node``'s state onto the mesh, in place."""
    rules.shard_state(node, self.mesh)

  def create(self, factory: Callable[[], nnx.Module]) -> nnx.Module:
    """``factory()`` built under jit with its state born on its shards."""
    @nnx.jit
    def build():
      model = factory()
      state = nnx.state(model)
      nnx.update(model, jax.lax.with_sharding_constraint(
          state, rules.state_shardings(state, self.mesh)))
      return model
    return build()

  def put_batch(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Host arrays [B, T] -> global arrays split over (batch, seq).

    Every process passes the same global batch (the iterators are seeded);
    each keeps the rows and positions of its own devices.
    """
    def place(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.batch_sharding,
                                          lambda index: x[index])
    return {k: place(v) for k, v in batch.items()}
