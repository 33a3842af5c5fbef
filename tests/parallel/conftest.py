"""The mesh tests need 8 devices of the default backend: tests/conftest.py
makes 8 CPU devices; a machine whose default backend has fewer (one GPU)
runs them with JAX_PLATFORMS=cpu."""

import jax
import pytest


def pytest_collection_modifyitems(items):
  count = jax.device_count()
  if count >= 8:
    return
  skip = pytest.mark.skip(reason=f"needs 8 devices, {jax.default_backend()} "
                          f"has {count} (run with JAX_PLATFORMS=cpu)")
  for item in items:
    if "tests/parallel/" in str(item.fspath).replace("\\", "/"):
      item.add_marker(skip)
