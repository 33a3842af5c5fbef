"""NSAAttention (Flax NNX): shapes, transforms, impl agreement, gradients."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from nsa_jax import NSAConfig
from nsa_jax.modules import NSAAttention

D_MODEL, NUM_HEADS, HEAD_DIM = 32, 4, 8
TINY = NSAConfig.tiny()  # l=8, d=4, l'=16, n=4 (1 initial, 2 local), w=32
# Ts = 8 blocks for T = 64 but only n = 3 slots: the selection really chooses.
SPARSE = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=3,
                   num_initial=1, num_local=1, window=8)
# n = num_initial + num_local: the selection is fixed by the forced blocks, so
# it is constant under perturbation (finite differences are valid) yet sparse
# (block 1 is skipped by queries of block 2 when T = 24).
FORCED_ONLY = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8,
                        num_selected=2, num_initial=1, num_local=1, window=6)


def make_attention(*, num_kv_heads=2, v_head_dim=None, shared_kv=False,
                   compression="mlp", config=TINY, impl="xla", seed=0,
                   d_model=D_MODEL, num_heads=NUM_HEADS, head_dim=HEAD_DIM):
  return NSAAttention(d_model, num_heads, num_kv_heads, head_dim,
                      v_head_dim=v_head_dim, config=config,
                      shared_kv=shared_kv, compression=compression, impl=impl,
                      rngs=nnx.Rngs(seed))


def make_input(seq_len, batch=2, d_model=D_MODEL, seed=1):
  # numpy, not jax.random: one threefry compilation per shape is slow on CPU.
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((batch, seq_len, d_model)),
                     jnp.float32)


# (T, Hkv, Dv, shared_kv, compression). T = 37 and 21 are multiples of no
# block size; T = 5 < cmp_block gives zero compressed tokens.
SHAPE_CASES = [
    pytest.param(37, 2, None, False, "mlp", id="T37-G2"),
    pytest.param(5, 2, None, False, "mlp", id="T5-no-compressed-tokens"),
    pytest.param(37, 4, None, False, "mean", id="G1-mha-mean"),
    pytest.param(21, 1, 12, False, "mlp", id="G4-mqa-dv12"),
    pytest.param(37, 2, 12, True, "mlp", id="shared-kv-dv12"),
]


@pytest.mark.parametrize("seq_len,num_kv_heads,v_head_dim,shared_kv,"
                         "compression", SHAPE_CASES)
def test_output_and_branch_shapes(seq_len, num_kv_heads, v_head_dim,
                                  shared_kv, compression):
  layer = make_attention(num_kv_heads=num_kv_heads, v_head_dim=v_head_dim,
                         shared_kv=shared_kv, compression=compression)
  x = make_input(seq_len)
  dv = v_head_dim or HEAD_DIM
  tc = TINY.num_compressed(seq_len)
  inputs, out = nnx.jit(lambda m, x: (m.branch_inputs(x), m(x)))(layer, x)
  chex.assert_shape(inputs["q"], (2, seq_len, NUM_HEADS, HEAD_DIM))
  for name in ("k", "k_win"):
    chex.assert_shape(inputs[name], (2, seq_len, num_kv_heads, HEAD_DIM))
  for name in ("v", "v_win"):
    chex.assert_shape(inputs[name], (2, seq_len, num_kv_heads, dv))
  chex.assert_shape(inputs["k_cmp"], (2, tc, num_kv_heads, HEAD_DIM))
  chex.assert_shape(inputs["v_cmp"], (2, tc, num_kv_heads, dv))
  chex.assert_shape(inputs["gates"], (2, seq_len, NUM_HEADS, 3))
  assert bool(jnp.all((inputs["gates"] > 0) & (inputs["gates"] < 1)))
  # Independent K/V per branch unless shared.
  same = bool(jnp.array_equal(inputs["k"], inputs["k_win"]))
  assert same == shared_kv
  assert set(layer.k_proj.keys()) == (
      {"shared"} if shared_kv else {"cmp", "slc", "win"})
  chex.assert_shape(out, (2, seq_len, D_MODEL))
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)


def test_constructor_rejects_bad_arguments():
  with pytest.raises(ValueError, match="impl"):
    make_attention(impl="triton")
  with pytest.raises(ValueError, match="num_kv_heads"):
    make_attention(num_kv_heads=3)
  with pytest.raises(ValueError, match="compression"):
    make_attention(compression="max")
  with pytest.raises(TypeError, match="NSAConfig"):
    make_attention(config={"cmp_block": 8})


def test_nnx_jit_matches_eager():
  layer = make_attention()
  x = make_input(37)
  forward = nnx.jit(lambda module, inputs: module(inputs))
  chex.assert_trees_all_close(forward(layer, x), layer(x), rtol=1e-6,
                              atol=1e-6)


def test_split_merge_round_trip():
  layer = make_attention()
  x = make_input(37)
  graphdef, state = nnx.split(layer)
  copied = jax.tree.map(lambda a: jnp.array(np.asarray(a)), state)
  rebuilt = nnx.merge(graphdef, copied)
  chex.assert_trees_all_equal(rebuilt(x), layer(x))
  chex.assert_trees_all_equal(nnx.state(rebuilt), state)
  # A pure function of the state, as a jit boundary, gives the same output.
  pure = jax.jit(lambda s, inputs: nnx.merge(graphdef, s)(inputs))
  chex.assert_trees_all_close(pure(state, x), layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config,seq_len,num_kv_heads,v_head_dim", [
    pytest.param(TINY, 37, 2, None, id="tiny-T37"),
    pytest.param(SPARSE, 64, 1, 12, id="sparse-T64-mqa-dv12"),
])
def test_xla_equals_reference(config, seq_len, num_kv_heads, v_head_dim):
  xla_layer = make_attention(config=config, num_kv_heads=num_kv_heads,
                             v_head_dim=v_head_dim, impl="xla")
  ref_layer = make_attention(config=config, num_kv_heads=num_kv_heads,
                             v_head_dim=v_head_dim, impl="reference")
  chex.assert_trees_all_equal(nnx.state(xla_layer), nnx.state(ref_layer))
  # The gates start at sigmoid(0) = 0.5, so every branch reaches the output.
  x = make_input(seq_len)
  chex.assert_trees_all_close(xla_layer(x), ref_layer(x), rtol=1e-5,
                              atol=1e-5)


@pytest.mark.parametrize("seq_len", [5, 37])
def test_nnx_grad_is_finite_and_reaches_every_branch(seq_len):
  layer = make_attention(config=TINY)
  x = make_input(seq_len)

  def loss(module):
    return jnp.mean(module(x) ** 2)

  grads = nnx.jit(nnx.grad(loss))(layer)
  chex.assert_tree_all_finite(grads)
  norms = {name: float(jnp.abs(grads[name]["kernel"][...]).sum())
           for name in ("q_proj", "gate_proj", "out_proj")}
  for branch in ("slc", "win"):
    norms[f"k_{branch}"] = float(
        jnp.abs(grads["k_proj"][branch]["kernel"][...]).sum())
  assert all(value > 0 for value in norms.values()), norms
  cmp_grad = float(jnp.abs(grads["compress_v"]["fc1"]["kernel"][...]).sum())
  if seq_len < TINY.cmp_block:
    assert cmp_grad == 0.0  # no compressed token: branch 1 outputs zeros
  else:
    assert cmp_grad > 0.0


def _fd_setup(dtype):
  """FORCED_ONLY layer (fixed selection, so smooth) as a pure function."""
  layer = NSAAttention(16, 2, 1, 4, config=FORCED_ONLY, impl="xla",
                       dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  # Non-zero gate weights so the gates depend on x.
  layer.gate_proj.kernel[...] = 0.3 * jnp.asarray(
      np.random.default_rng(5).standard_normal(layer.gate_proj.kernel.shape),
      dtype)
  graphdef, state = nnx.split(layer)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 24, 16)),
                  dtype)
  forward = jax.jit(lambda s, inputs: nnx.merge(graphdef, s)(inputs))
  return forward, state, x


def test_check_grads_against_finite_differences():
  """Reverse-mode gradient w.r.t. all params and x, float32 tolerances."""
  forward, state, x = _fd_setup(jnp.float32)
  check_grads(forward, (state, x), order=1, modes=["rev"])


def test_check_grads_float64():
  """The same check in float64 with tight tolerances."""
  with jax.enable_x64(True):
    forward, state, x = _fd_setup(jnp.float64)
    check_grads(forward, (state, x), order=1, modes=["rev"], atol=1e-6,
                rtol=1e-6, eps=1e-6)


def test_construction_refuses_what_its_impl_cannot_run():
  """Issue 10, item 7: refused at construction, not at the first call."""
  config = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=24, num_selected=4,
                     window=16)
  with pytest.raises(ValueError, match=r"impl='pallas'.*power of two"):
    NSAAttention(32, 4, 2, 16, config=config, impl="pallas",
                 rngs=nnx.Rngs(0))
  NSAAttention(32, 4, 2, 16, config=config, impl="xla", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="float64"):
    NSAAttention(32, 4, 2, 16, config=NSAConfig.tiny(), impl="pallas",
                 dtype=jnp.float64, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="impl='fast'"):
    NSAAttention(32, 4, 2, 16, impl="fast", rngs=nnx.Rngs(0))


def test_refuses_bad_width_and_non_float_input():
  """Issue 10, item 8."""
  with pytest.raises(ValueError, match="d_model=0"):
    NSAAttention(0, 4, 2, 16, config=NSAConfig.tiny(), rngs=nnx.Rngs(0))
  layer = NSAAttention(32, 4, 2, 16, config=NSAConfig.tiny(), impl="xla",
                       rngs=nnx.Rngs(0))
  for dtype in (jnp.int32, jnp.complex64):
    with pytest.raises(TypeError, match="real floating"):
      layer(jnp.zeros((1, 20, 32), dtype))
