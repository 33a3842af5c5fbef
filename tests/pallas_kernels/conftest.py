"""Skips the Triton lowering tests only where this jax cannot lower for CUDA."""

import jax
import jax.numpy as jnp
import pytest


def _can_lower_for_cuda():
  try:
    jax.jit(jnp.sin).trace(jnp.ones(2)).lower(lowering_platforms=("cuda",))
  except Exception as e:  # pylint: disable=broad-except
    return f"this jax cannot lower for cuda at all: {e!r}"
  return None


_REASON = _can_lower_for_cuda()


def pytest_collection_modifyitems(items):
  if _REASON is None:
    return
  for item in items:
    if "lowering" in item.keywords:
      item.add_marker(pytest.mark.skip(reason=_REASON))


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "lowering: lowers a kernel to Triton for CUDA on the CPU host")
