"""Fixtures of the nsa_jax tests: ``case`` runs a test on each CASES shape.

Marker ``gpu``: a test that compiles kernels for the GPU; skipped where jax
has no GPU backend.

The CPU backend shows 8 devices (``tests/parallel`` shards over them). XLA
reads the flag when the backend starts, not when jax is imported, so it is
set here, before any test runs anything; a test that asks for no mesh uses
device 0 alone, as before.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest

from nsa_cases import CASES

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" {_DEVICES_FLAG}=8").strip()

# The suite's time is mostly XLA compiling tiny programs (Pallas kernels in
# interpret mode above all), not running them. Two XLA:CPU settings halve
# it each: no LLVM optimisations, and the older elemental fusion emitters
# instead of the MLIR ones (test_ops.py and test_numerics.py on one core:
# 166 s -> 89 s of CPU with the second). A third saves CPU where two
# workers share two cores: code generated in one piece, not split for
# parallel LLVM threads (about 15% less CPU per compile). Results differ
# from the default build only in rounding (a few ulp: no fast math either
# way). Set in the environment, so the notebooks and scripts the tests
# start inherit them; a value the user set is kept. Not on a machine with
# an NVIDIA driver: there the GPU tests should compile what users run.
_FAST_COMPILE_FLAGS = {"--xla_backend_optimization_level": "0",
                       "--xla_cpu_use_fusion_emitters": "false",
                       "--xla_cpu_parallel_codegen_split_count": "1"}


def _xla_starts_with(flags: list[str]) -> bool:
  """Whether jax's CPU backend starts with ``flags`` added to XLA_FLAGS.

  XLA aborts the process on a flag it does not know, and a later jaxlib may
  drop one of these, so they are tried first in a child process: 0.8 s,
  once a run (the xdist workers inherit the result in XLA_FLAGS).
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": " ".join([os.environ["XLA_FLAGS"], *flags])}
  return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                        env=env, capture_output=True, check=False
                        ).returncode == 0


_NEW_FLAGS = [f"{flag}={value}" for flag, value in _FAST_COMPILE_FLAGS.items()
              if flag not in os.environ["XLA_FLAGS"]]
if _NEW_FLAGS and not shutil.which("nvidia-smi"):
  if not _xla_starts_with(_NEW_FLAGS):  # one by one only then
    _NEW_FLAGS = [f for f in _NEW_FLAGS if _xla_starts_with([f])]
  os.environ["XLA_FLAGS"] = " ".join([os.environ["XLA_FLAGS"], *_NEW_FLAGS])

# References compute float32 matmuls at full precision on every backend (a
# GPU's default is TF32, about 1e-3 off), so kernels are held to float32.
jax.config.update("jax_default_matmul_precision", "highest")

# One compilation cache for the whole run, shared by the xdist workers (whose
# parent is the controlling pytest process): tests compile many identical
# programs from different Python functions, which jax's in-memory cache,
# keyed by function, cannot share. Measured on 2 CPU cores: the kernel test
# files in 136 s instead of 154 s. Exported to the environment too, so the
# scripts and notebooks the tests start share it (the three train_lm.py runs
# of tests/train/test_resume.py compile the same programs). Removed when the
# run ends; a cache the user configured is left alone.
_RUN_PID = os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()
_JIT_CACHE = os.path.join(tempfile.gettempdir(),
                          f"nsa-jax-test-jit-cache-{_RUN_PID}")
if not (os.environ.get("JAX_COMPILATION_CACHE_DIR")
        or jax.config.jax_compilation_cache_dir):
  _CACHE_SETTINGS = {"jax_compilation_cache_dir": _JIT_CACHE,
                     "jax_persistent_cache_min_compile_time_secs": 0,
                     "jax_persistent_cache_min_entry_size_bytes": 0}
  for _name, _value in _CACHE_SETTINGS.items():
    jax.config.update(_name, _value)
    os.environ[_name.upper()] = str(_value)


def pytest_sessionfinish(session):
  if not hasattr(session.config, "workerinput"):  # the controlling process
    shutil.rmtree(_JIT_CACHE, ignore_errors=True)


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
