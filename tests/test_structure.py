"""Identities NSA must satisfy, and finite-difference gradient checks."""

import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import pytest

from nsa_jax import NSAConfig
from nsa_jax import ops
from nsa_jax.reference import masked_attention

from nsa_cases import Case
from nsa_cases import CASES
from nsa_cases import make_inputs
from nsa_cases import random_block_table
from nsa_cases import TINY


def _causal_full(x):
  t = jnp.arange(x["q"].shape[1])
  mask = (t[None, :] <= t[:, None])[None, :, None, :]
  return masked_attention(x["q"], x["k"], x["v"], mask,
                          x["q"].shape[-1] ** -0.5)[0]


def _gates(x, cmp, slc, win):
  return jnp.broadcast_to(jnp.array([cmp, slc, win], x["q"].dtype),
                          x["gates"].shape)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_selecting_every_block_is_full_attention(case, impl):
  config = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16,
                     num_selected=max(3, -(-case.t // 16) + 1), window=4)
  x = make_inputs(case, config=config)
  out = ops.nsa_attention(x["q"], x["k"], x["v"], _gates(x, 0, 1, 0), config,
                          k_cmp=x["k_cmp"], v_cmp=x["v_cmp"], impl=impl)
  chex.assert_trees_all_close(out, _causal_full(x), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_window_covering_sequence_is_full_attention(case, impl):
  x = make_inputs(case)
  out = ops.sliding_window_attention(x["q"], x["k"], x["v"], window=case.t,
                                     impl=impl)
  chex.assert_trees_all_close(out, _causal_full(x), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_gates_select_one_branch(case, impl):
  x = make_inputs(case)
  nsa = lambda *g: ops.nsa_attention(
      x["q"], x["k"], x["v"], _gates(x, *g), TINY, k_cmp=x["k_cmp"],
      v_cmp=x["v_cmp"], impl=impl)
  o_cmp, lse = ops.compressed_attention(
      x["q"], x["k_cmp"], x["v_cmp"], block_size=TINY.cmp_block,
      stride=TINY.cmp_stride, impl=impl)
  table = ops.select_blocks(x["q"], x["k_cmp"], lse, TINY)
  o_slc = ops.selected_attention(x["q"], x["k"], x["v"], table,
                                 block_size=TINY.sel_block, impl=impl)
  o_win = ops.sliding_window_attention(x["q"], x["k"], x["v"],
                                       window=TINY.window, impl=impl)
  tol = dict(atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(nsa(1, 0, 0), o_cmp, **tol)
  chex.assert_trees_all_close(nsa(0, 1, 0), o_slc, **tol)
  chex.assert_trees_all_close(nsa(0, 0, 1), o_win, **tol)


# Finite differences in float64 on two small shapes: T = 21 (off every block
# edge, two selection blocks, Dk != Dv, G = 2) and T = 5 < l.
FD_CASES = [Case(1, 21, 4, 2, 8, 4), CASES[1]]


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("case", FD_CASES, ids=str)
def test_finite_difference_gradients(case, impl):
  with jax.enable_x64(True):
    x = make_inputs(case, jnp.float64)
    table = random_block_table(case, TINY.num_selected, TINY.sel_block)

    def cmp(q, k_cmp, v_cmp):
      out, lse = ops.compressed_attention(
          q, k_cmp, v_cmp, block_size=TINY.cmp_block, stride=TINY.cmp_stride,
          impl=impl)
      return out, jnp.where(jnp.isfinite(lse), lse, 0.0)

    def slc(q, k, v):
      return ops.selected_attention(q, k, v, table, block_size=TINY.sel_block,
                                    impl=impl)

    def win(q, k, v):
      return ops.sliding_window_attention(q, k, v, window=6, impl=impl)

    def nsa(q, k, v, gates, k_cmp, v_cmp):
      return ops.nsa_attention(q, k, v, gates, TINY, k_cmp=k_cmp,
                               v_cmp=v_cmp, impl=impl)

    # Jitted: check_grads calls each function several times; eagerly, the
    # glue around the ops would run op by op.
    fd = dict(order=1, modes=["rev"], atol=1e-5, rtol=1e-5, eps=1e-6)
    check_grads(jax.jit(cmp), (x["q"], x["k_cmp"], x["v_cmp"]), **fd)
    check_grads(jax.jit(slc), (x["q"], x["k"], x["v"]), **fd)
    check_grads(jax.jit(win), (x["q"], x["k"], x["v"]), **fd)
    check_grads(jax.jit(nsa), tuple(x[n] for n in (
        "q", "k", "v", "gates", "k_cmp", "v_cmp")), **fd)
