"""The GPU suite: compiled kernels on a real GPU at realistic shapes.

Run on a GPU machine with ``python -m pytest -q tests/gpu`` (the project on
``PYTHONPATH``). Every test here gets the ``gpu`` marker, which
``tests/conftest.py`` skips where jax has no GPU backend.
"""

import pytest


def pytest_collection_modifyitems(items):
  for item in items:
    if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
      item.add_marker(pytest.mark.gpu)
