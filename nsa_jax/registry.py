"""Implementations of one op, each with a predicate saying what it serves.

In the spirit of tokamax's ``implementation=`` API. An implementation is a
callable plus ``supports``, a function of the same arguments that returns
None when it can serve the call and otherwise a short reason. ``"auto"``
takes the first registered implementation that is offered on the current
backend and supports the call; an explicit name that cannot serve raises a
ValueError carrying the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

AUTO = "auto"


def _serves_all(*args, **kwargs):
  del args, kwargs
  return None


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to compute an op.

  Attributes:
    name: what ``impl=`` calls it.
    fn: ``fn(*arrays, **static)`` with the op's (already validated)
      arguments.
    supports: same arguments; None or why this implementation cannot serve.
    auto_backends: backends (``jax.default_backend()``) on which "auto"
      considers it; empty: only when asked for by name.
  """

  name: str
  fn: Callable
  supports: Callable[..., str | None] = _serves_all
  auto_backends: tuple[str, ...] = ()


class Registry:
  """The implementations of one op, in the order "auto" tries them."""

  def __init__(self, op: str):
    self.op = op
    self._impls: dict[str, Implementation] = {}

  def register(self, name: str, fn: Callable,
               supports: Callable[..., str | None] = _serves_all, *,
               auto_backends=()) -> Implementation:
    """Adds an implementation; "auto" tries them in registration order."""
    if name == AUTO or name in self._impls:
      raise ValueError(f"{self.op}: implementation {name!r} is reserved or "
                       "already registered")
    impl = Implementation(name, fn, supports, tuple(auto_backends))
    self._impls[name] = impl
    return impl

  def names(self) -> tuple[str, ...]:
    """Registered names, in "auto" order, then "auto"."""
    return (*self._impls, AUTO)

  def check_name(self, impl) -> None:
    """Raises ValueError unless ``impl`` names an implementation or auto."""
    names = self.names()
    if not isinstance(impl, str) or impl not in names:
      raise ValueError(f"{self.op}: impl={impl!r} is not one of {names}")

  def reasons(self, *args, **kwargs) -> dict[str, str | None]:
    """name -> None (can serve) or the reason it cannot, for one call."""
    return {name: impl.supports(*args, **kwargs)
            for name, impl in self._impls.items()}

  def resolve(self, impl, *args, **kwargs) -> Implementation:
    """The implementation that runs ``impl`` on these arguments.

    Args:
      impl: a registered name, "auto", or a tuple of names tried in order.
      *args, **kwargs: the call's arguments (arrays or ShapeDtypeStructs
        and static settings), as the implementations take them.

    Returns:
      The ``Implementation`` to call.

    Raises:
      ValueError: an unknown name, or no candidate supports the call; the
        message gives each candidate's reason.
    """
    if isinstance(impl, tuple):
      candidates = impl
      for name in candidates:
        self.check_name(name)
    else:
      self.check_name(impl)
      if impl == AUTO:
        backend = jax.default_backend()
        candidates = tuple(name for name, entry in self._impls.items()
                           if backend in entry.auto_backends)
      else:
        candidates = (impl,)
    refused = []
    for name in candidates:
      entry = self._impls[name]
      reason = entry.supports(*args, **kwargs)
      if reason is None:
        return entry
      refused.append(f"{name}: {reason}")
    raise ValueError(f"{self.op}(impl={impl!r}) cannot serve this call: "
                     + "; ".join(refused or ["no implementation is offered "
                                             "on this backend"]))
