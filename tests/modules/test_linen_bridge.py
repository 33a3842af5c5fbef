"""NSAAttention inside a flax.linen model through flax.nnx.bridge.to_linen."""

import chex
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig
from nsa_jax.modules import NSAAttention

D_MODEL = 32
CONFIG = NSAConfig.tiny()


class LinenNSABlock(nn.Module):
  """A Linen model: Dense -> NSAAttention (NNX, bridged) residual -> Dense."""

  out_features: int = 8

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(D_MODEL, name="embed")(x)
    attn = bridge.to_linen(NSAAttention, D_MODEL, 4, 2, 8, config=CONFIG,
                           impl="xla", name="nsa")
    h = h + attn(h)
    return nn.Dense(self.out_features, name="head")(h)


MODEL = LinenNSABlock()
APPLY = jax.jit(MODEL.apply)


@pytest.fixture(scope="module", name="x")
def fixture_x():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.standard_normal((2, 37, 16)), jnp.float32)


@pytest.fixture(scope="module", name="variables")
def fixture_variables(x):
  return jax.jit(MODEL.init)(jax.random.key(0), x)


def test_init_apply_grad(x, variables):
  nsa_params = variables["params"]["nsa"]
  assert set(nsa_params) >= {"q_proj", "k_proj", "v_proj", "compress_k",
                             "compress_v", "gate_proj", "out_proj"}
  assert set(nsa_params["k_proj"]) == {"cmp", "slc", "win"}
  chex.assert_shape(nsa_params["compress_k"]["position"],
                    (CONFIG.cmp_block, 8))

  y = APPLY(variables, x)
  chex.assert_shape(y, (2, 37, 8))
  chex.assert_tree_all_finite(y)
  # Deterministic: apply rebuilds the NNX module from the Linen variables.
  chex.assert_trees_all_equal(APPLY(variables, x), y)

  def loss(params):
    return jnp.mean(MODEL.apply({"params": params}, x) ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  chex.assert_trees_all_equal_shapes(grads, variables["params"])
  chex.assert_tree_all_finite(grads)
  for path in (("nsa", "q_proj", "kernel"), ("nsa", "compress_v", "fc1",
                                              "kernel"),
               ("nsa", "k_proj", "slc", "kernel"), ("embed", "kernel")):
    leaf = grads
    for key in path:
      leaf = leaf[key]
    assert float(jnp.abs(leaf).sum()) > 0, path


def test_bridged_layer_equals_the_nnx_layer_with_the_same_params(x,
                                                                 variables):
  params = variables["params"]
  h = x @ params["embed"]["kernel"] + params["embed"]["bias"]
  layer = NSAAttention(D_MODEL, 4, 2, 8, config=CONFIG, impl="xla",
                       rngs=nnx.Rngs(123))
  nnx.update(layer, nnx.State(params["nsa"]))
  h = h + nnx.jit(lambda module, inputs: module(inputs))(layer, h)
  want = h @ params["head"]["kernel"] + params["head"]["bias"]
  chex.assert_trees_all_close(APPLY(variables, x), want, rtol=1e-5,
                              atol=1e-5)
