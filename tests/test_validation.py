"""Bad input to nsa_jax.ops raises an error that names the problem."""

import jax.numpy as jnp
import pytest

from nsa_jax import ops

from nsa_cases import Case
from nsa_cases import make_inputs
from nsa_cases import TINY

CASE = Case(2, 37, 4, 2, 16, 8)


@pytest.fixture
def x():
  return make_inputs(CASE)


def _nsa(x, **changes):
  args = dict(x, **changes)
  return ops.nsa_attention(args["q"], args["k"], args["v"], args["gates"],
                           TINY, k_cmp=args["k_cmp"], v_cmp=args["v_cmp"],
                           impl="xla")


@pytest.mark.parametrize("changes, error, match", [
    (dict(k=jnp.zeros((1, 37, 2, 16))), ValueError, "batch"),
    (dict(v=jnp.zeros((2, 36, 2, 8))), ValueError, "sequence length"),
    (dict(k=jnp.zeros((2, 36, 2, 16)), v=jnp.zeros((2, 36, 2, 8))),
     ValueError, "sequence length"),
    (dict(v=jnp.zeros((2, 37, 1, 8))), ValueError, "kv heads"),
    (dict(q=jnp.zeros((2, 37, 3, 16))), ValueError, "multiple"),
    (dict(q=jnp.zeros((2, 37, 4, 8))), ValueError, "Dk"),
    (dict(q=jnp.zeros((2, 37, 4, 16), jnp.int32)), TypeError, "floating"),
    (dict(k=jnp.zeros((37, 2, 16))), ValueError, r"\[batch, seq"),
    (dict(k_cmp=jnp.zeros((2, 6, 2, 16)), v_cmp=jnp.zeros((2, 6, 2, 8))),
     ValueError, r"\(T - l\) // d \+ 1 = 8"),
    (dict(v_cmp=jnp.zeros((2, 8, 2, 4))), ValueError, "Dv"),
    (dict(gates=jnp.zeros((2, 37, 4, 2))), ValueError, "gates"),
], ids=["batch", "v-length", "k-length", "kv-heads", "gqa", "dk", "int-q",
        "rank", "k_cmp-length", "v_cmp-dv", "gates"])
def test_nsa_attention_rejects(x, changes, error, match):
  with pytest.raises(error, match=match):
    _nsa(x, **changes)


def test_unknown_impl(x):
  with pytest.raises(ValueError, match="impl='fast'"):
    ops.sliding_window_attention(x["q"], x["k"], x["v"], window=4,
                                 impl="fast")


def test_only_one_window_kv(x):
  with pytest.raises(ValueError, match="k_win and v_win"):
    ops.nsa_attention(x["q"], x["k"], x["v"], x["gates"], TINY,
                      k_cmp=x["k_cmp"], v_cmp=x["v_cmp"], k_win=x["k"])


def test_config_type(x):
  with pytest.raises(TypeError, match="NSAConfig"):
    ops.nsa_attention(x["q"], x["k"], x["v"], x["gates"], {"window": 4},
                      k_cmp=x["k_cmp"], v_cmp=x["v_cmp"])


@pytest.mark.parametrize("table, error, match", [
    (jnp.zeros((2, 37, 2, 4), jnp.float32), TypeError, "integer"),
    (jnp.zeros((2, 37, 4), jnp.int32), ValueError, r"\[B, T, Hkv, n\]"),
    (jnp.zeros((2, 37, 1, 4), jnp.int32), ValueError, r"\[B, T, Hkv, n\]"),
], ids=["float", "rank", "heads"])
def test_block_indices(x, table, error, match):
  with pytest.raises(error, match=match):
    ops.selected_attention(x["q"], x["k"], x["v"], table, block_size=16)


def test_bad_block_size(x):
  with pytest.raises(ValueError, match="block_size"):
    ops.selected_attention(x["q"], x["k"], x["v"],
                           jnp.zeros((2, 37, 2, 4), jnp.int32), block_size=0)


def test_lse_shape(x):
  with pytest.raises(ValueError, match="lse"):
    ops.select_blocks(x["q"], x["k_cmp"], jnp.zeros((2, 37, 2)), TINY)
