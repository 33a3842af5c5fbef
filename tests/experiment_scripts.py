"""An ``experiments/`` script loaded as a module, so a test calls its
``main`` in this process (a subprocess each would pay a jax import)."""

import importlib.util
import pathlib

_EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def load(name: str):
  """The module of ``experiments/<name>.py``, freshly executed."""
  spec = importlib.util.spec_from_file_location(
      f"{name}_script", _EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
