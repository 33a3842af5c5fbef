"""The GPU suite: compiled kernels on a real GPU; skipped where there is none.

Run on a GPU machine with ``python -m pytest -q tests/gpu`` (the project on
``PYTHONPATH``). Every test here carries the ``gpu`` marker.
"""

import jax
import pytest


def pytest_collection_modifyitems(items):
  has_gpu = jax.default_backend() == "gpu"
  for item in items:
    if "tests/gpu/" not in str(item.fspath).replace("\\", "/"):
      continue
    item.add_marker(pytest.mark.gpu)
    if not has_gpu:
      item.add_marker(pytest.mark.skip(reason="needs a GPU backend"))


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: compiles and runs on a real GPU")
