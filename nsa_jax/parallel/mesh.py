"""The device mesh: four named axes, sized from flags.

  data      pure data parallelism: batch split, parameters replicated
  fsdp      batch split, parameters and optimizer state split too (ZeRO-3)
  tensor    attention heads and MLP width split (Megatron-style)
  sequence  the sequence axis split (context parallelism, see
            ``nsa_jax.parallel.context``)

``MeshConfig(data=2, sequence=4).make()`` builds a ``jax.sharding.Mesh``
with the axes in that order over all devices (every process's, after
``jax.distributed.initialize``). One axis may be -1: it takes the devices
the others leave.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax

AXES = ("data", "fsdp", "tensor", "sequence")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; their product is the number of devices.

  Attributes:
    data, fsdp, tensor, sequence: axis sizes (see the module docstring);
      at most one may be -1, "the devices left".
  """

  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1

  def __post_init__(self):
    sizes = self.sizes
    for name, size in zip(AXES, sizes):
      if isinstance(size, bool) or not isinstance(size, int) or (
          size < 1 and size != -1):
        raise ValueError(f"mesh axis {name}={size!r} must be a positive int "
                         "or -1 (the devices the other axes leave)")
    if sizes.count(-1) > 1:
      raise ValueError(f"only one mesh axis may be -1, got {self}")

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(getattr(self, name) for name in AXES)

  def resolve(self, num_devices: int) -> MeshConfig:
    """This config with -1 replaced, checked against ``num_devices``.

    Raises:
      ValueError: the sizes do not multiply to ``num_devices``.
    """
    fixed = math.prod(s for s in self.sizes if s != -1)
    if -1 in self.sizes:
      if num_devices % fixed:
        raise ValueError(f"mesh {self.describe()}: the fixed axes use "
                         f"{fixed} devices, which does not divide the "
                         f"{num_devices} devices present")
      return dataclasses.replace(
          self, **{n: num_devices // fixed for n, s in zip(AXES, self.sizes)
                   if s == -1})
    if fixed != num_devices:
      raise ValueError(
          f"mesh {self.describe()} needs {fixed} devices, but there are "
          f"{num_devices}; make the sizes multiply to {num_devices} (one "
          "axis may be -1 to take the rest)")
    return self

  def describe(self) -> str:
    return " x ".join(f"{n}={s}" for n, s in zip(AXES, self.sizes))

  def make(self, devices: Sequence[jax.Device] | None = None
           ) -> jax.sharding.Mesh:
    """The ``Mesh`` over ``devices`` (default: all devices, all processes).

    Axis types are ``Auto`` (sharding propagated by the compiler) on every
    jax version.
    """
    devices = list(jax.devices() if devices is None else devices)
    cfg = self.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    return jax.make_mesh(cfg.sizes, AXES, axis_types=auto, devices=devices)


def axis_size(mesh: jax.sharding.Mesh, name: str) -> int:
  """Size of mesh axis ``name``; 1 for an axis the mesh does not have."""
  return dict(mesh.shape).get(name, 1)
