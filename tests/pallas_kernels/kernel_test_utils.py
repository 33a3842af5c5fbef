"""Shared helpers of the Pallas kernel tests: inputs, tolerances, checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import nsa_cases
from nsa_cases import tolerance

normal = nsa_cases.normal  # the kernel tests' random inputs, drawn by NumPy


def assert_close(actual, expected, dtype, kind="fwd"):
  """Compares as float32 with the per-dtype tolerance; -inf must match."""
  tol = tolerance(dtype, kind)
  to32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
  chex.assert_trees_all_close(jax.tree.map(to32, actual),
                              jax.tree.map(to32, expected), atol=tol, rtol=tol)


def output_and_grads(fn, d_out):
  """jit of ``*args -> (fn(*args), gradients of the loss in every arg)``.

  ``fn`` returns ``out`` or ``(out, lse)``; the loss is ``sum(out * d_out)``
  in float32, plus ``sum(sin(lse))`` over the finite lse (whose cotangent
  feeds a kernel's delta term). One compilation, where a forward call and
  ``jax.grad`` compile three programs (forward, grad's forward, backward):
  interpret-mode kernels compile in seconds and run in milliseconds.
  """
  def loss(*args):
    out = fn(*args)
    main, lse = out if isinstance(out, tuple) else (out, jnp.zeros(()))
    return (jnp.sum(main.astype(jnp.float32) * d_out)
            + jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0)))

  def run(*args):
    argnums = tuple(range(len(args)))
    return fn(*args), jax.grad(loss, argnums)(*args)
  return jax.jit(run)


def assert_finite(tree):
  for leaf in jax.tree.leaves(tree):
    assert not np.isnan(np.asarray(leaf, np.float32)).any(), "NaN found"


def assert_bitwise_equal(a, b):
  """Two runs of a kernel: outputs and gradients identical bit for bit."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8),
                                  np.asarray(y).view(np.uint8))


def lower_for_cuda(fn, *args):
  """Runs the real Pallas -> Triton lowering on this CPU host."""
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
