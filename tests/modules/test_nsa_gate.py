"""NSAAttention's gates: the linear default and the paper's MLP gate."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig
from nsa_jax.modules import NSAAttention

D_MODEL, HQ, HKV, DK = 32, 4, 2, 8


def make(**kw):
  return NSAAttention(D_MODEL, HQ, HKV, DK, config=NSAConfig.tiny(),
                      impl="xla", rngs=nnx.Rngs(0), **kw)


def _x(b=2, t=40, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, t, D_MODEL))


def _paths(module):
  return sorted("/".join(map(str, path)) for path, _ in
                nnx.to_flat_state(nnx.state(module, nnx.Param)))


def test_linear_gate_is_the_default_and_unchanged():
  """Default == gate="linear": same parameter tree (one gate_proj, as
  before the option existed), same values, and gates equal to
  sigmoid(x @ W + b) exactly."""
  default, linear = make(), make(gate="linear")
  assert default.gate == "linear"
  paths = _paths(default)
  assert [p for p in paths if "gate" in p] == ["gate_proj/bias",
                                               "gate_proj/kernel"]
  assert paths == _paths(linear)
  chex.assert_trees_all_equal(nnx.state(default, nnx.Param),
                              nnx.state(linear, nnx.Param))
  # Perturb the zero-initialised kernel so the gates are not all 0.5.
  kernel = default.gate_proj.kernel
  kernel[...] = jax.random.normal(jax.random.key(3), kernel.shape)
  x = _x()
  gates = default.branch_inputs(x)["gates"]
  want = jax.nn.sigmoid(x @ kernel[...] + default.gate_proj.bias[...])
  chex.assert_trees_all_equal(gates, want.reshape(2, 40, HQ, 3))


@pytest.mark.parametrize("hidden", [None, 16])
def test_mlp_gate_shapes_range_and_start(hidden):
  module = make(gate="mlp", gate_hidden=hidden)
  width = hidden or D_MODEL // 4
  assert module.gate_hidden_proj.kernel.shape == (D_MODEL, width)
  assert module.gate_proj.kernel.shape == (width, HQ * 3)
  x = _x()
  gates = module.branch_inputs(x)["gates"]
  chex.assert_shape(gates, (2, 40, HQ, 3))
  np.testing.assert_array_equal(np.asarray(gates), 0.5)  # zero last layer
  module.gate_proj.kernel[...] = 5.0 * jax.random.normal(
      jax.random.key(4), module.gate_proj.kernel.shape)
  gates = module.branch_inputs(x)["gates"]
  assert float(gates.min()) >= 0.0 and float(gates.max()) <= 1.0
  assert float(jnp.std(gates)) > 0.05  # depends on x now
  hidden_act = jax.nn.silu(module.gate_hidden_proj(x))
  want = jax.nn.sigmoid(module.gate_proj(hidden_act)).reshape(gates.shape)
  chex.assert_trees_all_close(gates, want, rtol=1e-6, atol=1e-6)
  out = module(x)
  chex.assert_shape(out, x.shape)
  chex.assert_tree_all_finite(out)


def test_mlp_gate_trains():
  """Gradients reach both gate layers after one step of the last layer."""
  module = make(gate="mlp")
  x = _x()

  def loss(module):
    return jnp.sum(module(x) ** 2)

  grad = nnx.jit(nnx.grad(loss))
  grads = grad(module)
  assert float(jnp.abs(grads.gate_proj.kernel[...]).max()) > 0
  module.gate_proj.kernel[...] = 0.1 * jnp.ones_like(
      module.gate_proj.kernel[...])
  grads = grad(module)
  assert float(jnp.abs(grads.gate_hidden_proj.kernel[...]).max()) > 0


def test_bad_gate_is_refused():
  with pytest.raises(ValueError, match="gate='softmax'"):
    make(gate="softmax")
  with pytest.raises(ValueError, match="gate_hidden"):
    make(gate="mlp", gate_hidden=-2)
