"""Bad input to nsa_jax.ops raises an error that names the problem."""

import jax
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


IMPLS = ("reference", "xla", "pallas")


@pytest.mark.parametrize("impl", IMPLS)
def test_k_cmp_length_checked_on_every_path(x, impl):
  """Issue 10, item 7: the same call is refused the same way everywhere."""
  with pytest.raises(ValueError, match=r"\(T - l\) // d \+ 1 = 8"):
    ops.nsa_attention(x["q"], x["k"], x["v"], x["gates"], TINY,
                      k_cmp=x["k_cmp"][:, :6], v_cmp=x["v_cmp"][:, :6],
                      impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_compressed_block_must_be_a_multiple_of_stride(x, impl):
  with pytest.raises(ValueError, match="multiple of stride"):
    ops.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], block_size=6,
                             stride=4, impl=impl)


def test_explicit_impl_that_cannot_serve_says_why(x):
  table = jnp.zeros((2, 37, 2, 4), jnp.int32)
  with pytest.raises(ValueError, match=r"impl='pallas'.*power of two >= 16"):
    ops.selected_attention(x["q"], x["k"], x["v"], table, block_size=24,
                           impl="pallas")
  with jax.enable_x64(True):
    as64 = {n: a.astype(jnp.float64) for n, a in x.items()}
    with pytest.raises(ValueError, match="float64"):
      ops.sliding_window_attention(as64["q"], as64["k"], as64["v"], window=4,
                                   impl="pallas")
  with pytest.raises(ValueError, match="impl='cudnn' is not one of"):
    ops.selected_attention(x["q"], x["k"], x["v"], table, block_size=16,
                           impl="cudnn")


def test_implementations_lists_and_explains(x):
  assert ops.implementations("selected_attention") == (
      "pallas", "xla", "reference", "auto")
  assert ops.implementations("sliding_window_attention")[0] == "cudnn"
  table = jnp.zeros((2, 37, 2, 4), jnp.int32)
  report = ops.implementations("selected_attention", x["q"], x["k"], x["v"],
                               table, block_size=24)
  assert report["xla"] is None and report["reference"] is None
  assert "power of two" in report["pallas"]
  assert report["auto"] == "xla"  # on a CPU, or as the fallback on a GPU
  with pytest.raises(ValueError, match="op='attention'"):
    ops.implementations("attention")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 37), (2, 0)], ids=["B0", "T0"])
def test_empty_batches_give_empty_outputs(impl, shape):
  """Issue 10, item 8: B = 0 or T = 0 works on every path."""
  b, t = shape
  q = jnp.zeros((b, t, 4, 16))
  k = jnp.zeros((b, t, 2, 16))
  v = jnp.zeros((b, t, 2, 8))
  tc = TINY.num_compressed(t)
  k_cmp, v_cmp = jnp.zeros((b, tc, 2, 16)), jnp.zeros((b, tc, 2, 8))
  gates = jnp.zeros((b, t, 4, 3))

  def loss(q, k, v):
    return ops.nsa_attention(q, k, v, gates, TINY, k_cmp=k_cmp, v_cmp=v_cmp,
                             impl=impl).sum()

  out = ops.nsa_attention(q, k, v, gates, TINY, k_cmp=k_cmp, v_cmp=v_cmp,
                          impl=impl)
  assert out.shape == (b, t, 4, 8)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
  table = jnp.zeros((b, t, 2, 4), jnp.int32)
  assert ops.selected_attention(q, k, v, table, block_size=16,
                                impl=impl).shape == (b, t, 4, 8)
  assert ops.sliding_window_attention(q, k, v, window=3,
                                      impl=impl).shape == (b, t, 4, 8)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shapes, match", [
    (((2, 37, 0, 16), (2, 37, 0, 16), (2, 37, 0, 8)), "Hkv=0"),
    (((2, 37, 0, 16), (2, 37, 2, 16), (2, 37, 2, 8)), "Hq=0"),
    (((2, 37, 4, 0), (2, 37, 2, 0), (2, 37, 2, 8)), "Dk=0"),
    (((2, 37, 4, 16), (2, 37, 2, 16), (2, 37, 2, 0)), "Dv=0"),
], ids=["Hkv", "Hq", "Dk", "Dv"])
def test_zero_heads_or_dims_are_refused_by_name(impl, shapes, match):
  q, k, v = (jnp.zeros(s) for s in shapes)
  with pytest.raises(ValueError, match=match):
    ops.sliding_window_attention(q, k, v, window=4, impl=impl)
