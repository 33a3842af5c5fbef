"""nsa_jax.ops: the XLA path against the dense reference, value and gradient."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import ops

from nsa_cases import CASES
from nsa_cases import make_inputs
from nsa_cases import random_block_table
from nsa_cases import TINY
from nsa_cases import TOLERANCE

DTYPES = [jnp.float32, jnp.bfloat16]


def _close(actual, expected, dtype):
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), actual),
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), expected),
      **TOLERANCE[dtype])


def _grads(loss, argnums=(0, 1, 2)):
  """Jitted gradients: one compiled program, not the loss's glue op by op."""
  return jax.jit(jax.grad(loss, argnums=argnums))


def _compressed(impl, x):
  return ops.compressed_attention(
      x["q"], x["k_cmp"], x["v_cmp"], block_size=TINY.cmp_block,
      stride=TINY.cmp_stride, impl=impl)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_compressed_attention(case, dtype):
  x = make_inputs(case, dtype)
  out, lse = _compressed("xla", x)
  out_ref, lse_ref = _compressed("reference", x)
  chex.assert_shape(out, (case.b, case.t, case.hq, case.dv))
  assert out.dtype == dtype and lse.dtype == jnp.float32
  _close(out, out_ref, dtype)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_ref))
  _close(jnp.where(jnp.isinf(lse), 0, lse),
         jnp.where(jnp.isinf(lse_ref), 0, lse_ref), dtype)


def test_compressed_attention_blind_queries_are_zero(case):
  """Queries t < l - 1 see no compressed token: out 0, lse -inf, no NaN."""
  x = make_inputs(case)
  blind = min(case.t, TINY.cmp_block - 1)
  for impl in ("xla", "reference"):
    out, lse = _compressed(impl, x)
    np.testing.assert_array_equal(out[:, :blind], 0.0)
    assert np.all(np.isneginf(lse[:, :blind]))
    assert np.all(np.isfinite(lse[:, blind:]))

    def loss(q, k_cmp, v_cmp):
      o, l = ops.compressed_attention(q, k_cmp, v_cmp,
                                      block_size=TINY.cmp_block,
                                      stride=TINY.cmp_stride, impl=impl)
      return (o ** 2).sum() + jnp.where(jnp.isfinite(l), l, 0.0).sum()

    grads = _grads(loss)(x["q"], x["k_cmp"], x["v_cmp"])
    chex.assert_tree_all_finite(grads)
    np.testing.assert_array_equal(grads[0][:, :blind], 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_selected_attention(case, dtype):
  x = make_inputs(case, dtype)
  table = random_block_table(case, TINY.num_selected, TINY.sel_block)
  run = lambda impl: ops.selected_attention(
      x["q"], x["k"], x["v"], table, block_size=TINY.sel_block, impl=impl)
  out = run("xla")
  chex.assert_shape(out, (case.b, case.t, case.hq, case.dv))
  _close(out, run("reference"), dtype)


def test_selected_attention_empty_table_gives_zero(case):
  x = make_inputs(case)
  table = jnp.full((case.b, case.t, case.hkv, 3), -1, jnp.int32)
  for impl in ("xla", "reference"):
    f = lambda q, k, v: ops.selected_attention(
        q, k, v, table, block_size=TINY.sel_block, impl=impl)
    np.testing.assert_array_equal(f(x["q"], x["k"], x["v"]), 0.0)
    grads = _grads(lambda *a: f(*a).sum())(x["q"], x["k"], x["v"])
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("window", [1, 7, 16, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_sliding_window_attention(case, window, dtype):
  x = make_inputs(case, dtype)
  run = lambda impl: ops.sliding_window_attention(
      x["q"], x["k"], x["v"], window=window, impl=impl)
  _close(run("xla"), run("reference"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_block_scores(case, dtype):
  x = make_inputs(case, dtype)
  _, lse = _compressed("reference", x)
  run = lambda impl: ops.block_scores(x["q"], x["k_cmp"], lse, TINY,
                                      impl=impl)
  scores = run("xla")
  chex.assert_shape(scores, (case.b, case.t, case.hkv,
                             TINY.num_selection_blocks(case.t)))
  _close(scores, run("reference"), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_nsa_attention(case, dtype):
  x = make_inputs(case, dtype)
  run = lambda impl: ops.nsa_attention(
      x["q"], x["k"], x["v"], x["gates"], TINY, k_cmp=x["k_cmp"],
      v_cmp=x["v_cmp"], impl=impl)
  out = run("xla")
  chex.assert_shape(out, (case.b, case.t, case.hq, case.dv))
  assert out.dtype == dtype
  _close(out, run("reference"), dtype)


def test_nsa_attention_separate_window_kv(case):
  x = make_inputs(case)
  y = make_inputs(case, seed=1)
  run = lambda impl: ops.nsa_attention(
      x["q"], x["k"], x["v"], x["gates"], TINY, k_cmp=x["k_cmp"],
      v_cmp=x["v_cmp"], k_win=y["k"], v_win=y["v"], impl=impl)
  _close(run("xla"), run("reference"), jnp.float32)


def _nsa_loss(impl):
  def loss(q, k, v, gates, k_cmp, v_cmp):
    out = ops.nsa_attention(q, k, v, gates, TINY, k_cmp=k_cmp, v_cmp=v_cmp,
                            impl=impl)
    return (out * jnp.cos(out)).sum()
  return loss


def test_nsa_gradients_match_reference(case):
  x = make_inputs(case)
  args = [x[n] for n in ("q", "k", "v", "gates", "k_cmp", "v_cmp")]
  grads = _grads(_nsa_loss("xla"), range(6))(*args)
  grads_ref = _grads(_nsa_loss("reference"), range(6))(*args)
  chex.assert_tree_all_finite(grads)
  chex.assert_trees_all_close(grads, grads_ref, atol=1e-4, rtol=1e-4)


def test_branch_gradients_match_reference(case):
  x = make_inputs(case)
  table = random_block_table(case, TINY.num_selected, TINY.sel_block)

  def losses(impl):
    def cmp(q, k_cmp, v_cmp):
      out, lse = _compressed(impl, dict(q=q, k_cmp=k_cmp, v_cmp=v_cmp))
      return (out ** 2).sum() + jnp.where(jnp.isfinite(lse), lse, 0).sum()

    def slc(q, k, v):
      return (ops.selected_attention(q, k, v, table,
                                     block_size=TINY.sel_block,
                                     impl=impl) ** 2).sum()

    def win(q, k, v):
      return (ops.sliding_window_attention(q, k, v, window=5,
                                           impl=impl) ** 2).sum()
    return cmp, slc, win

  arg_sets = [(x["q"], x["k_cmp"], x["v_cmp"]), (x["q"], x["k"], x["v"]),
              (x["q"], x["k"], x["v"])]
  for f, f_ref, args in zip(losses("xla"), losses("reference"), arg_sets):
    chex.assert_trees_all_close(_grads(f)(*args), _grads(f_ref)(*args),
                                atol=1e-4, rtol=1e-4)


def test_jit_with_static_config(case):
  x = make_inputs(case)

  @jax.jit
  def f(q, k, v, gates, k_cmp, v_cmp):
    return ops.nsa_attention(q, k, v, gates, TINY, k_cmp=k_cmp, v_cmp=v_cmp,
                             impl="xla")

  chex.assert_trees_all_close(
      f(*[x[n] for n in ("q", "k", "v", "gates", "k_cmp", "v_cmp")]),
      ops.nsa_attention(x["q"], x["k"], x["v"], x["gates"], TINY,
                        k_cmp=x["k_cmp"], v_cmp=x["v_cmp"],
                        impl="reference"), atol=2e-5, rtol=2e-5)


def test_auto_resolves_to_xla_on_cpu():
  assert ops.resolve_impl("auto") == ("pallas" if jax.default_backend() ==
                                      "gpu" else "xla")


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=str)
def test_nsa_attention_pallas_interpret(case):
  """impl="pallas" routes every branch through the kernels (interpret mode)."""
  x = make_inputs(case)
  args = [x[n] for n in ("q", "k", "v", "gates", "k_cmp", "v_cmp")]
  # Loss and gradients in one jitted program per impl.
  run = lambda impl: jax.jit(jax.value_and_grad(  # pylint: disable=g-long-lambda
      _nsa_loss(impl), argnums=range(6)))(*args)
  chex.assert_trees_all_close(run("pallas"), run("reference"), atol=1e-4,
                              rtol=1e-4)


def test_auto_falls_back_to_xla_for_block_sizes_the_kernel_lacks(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  x = make_inputs(CASES[0])
  table = random_block_table(CASES[0], TINY.num_selected, 24)

  def chosen(impl, block_size):
    return ops.SELECTED.resolve(impl, x["q"], x["k"], x["v"], table,
                                block_size=block_size, scale=None).name

  assert chosen("auto", 24) == "xla"
  assert chosen("auto", 32) == "pallas"
  assert chosen("xla", 32) == "xla"
