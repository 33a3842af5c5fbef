"""Fixtures of the nsa_jax tests: ``case`` runs a test on each CASES shape.

Marker ``gpu``: a test that compiles kernels for the GPU; skipped where jax
has no GPU backend.

The CPU backend shows 8 devices (``tests/parallel`` shards over them). XLA
reads the flag when the backend starts, not when jax is imported, so it is
set here, before any test runs anything; a test that asks for no mesh uses
device 0 alone, as before.
"""

import os

import jax
import pytest

from nsa_cases import CASES

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" {_DEVICES_FLAG}=8").strip()

# References compute float32 matmuls at full precision on every backend (a
# GPU's default is TF32, about 1e-3 off), so kernels are held to float32.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "gpu: compiles and runs kernels on a GPU (skipped without)")


def pytest_collection_modifyitems(items):
  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason="needs a GPU backend")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(params=CASES, ids=str)
def case(request):
  return request.param
