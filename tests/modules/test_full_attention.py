"""FullAttention's dense path: which implementation runs where, and padding."""

import functools

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.modules import dense_attention as da
from nsa_jax.modules import FullAttention

from nsa_cases import normal

H100 = da.Backend("cuda", (9, 0))
A100 = da.Backend("cuda", (8, 0))


@pytest.mark.parametrize("backend,dtype,head_dim,v_head_dim,want", [
    (H100, jnp.bfloat16, 64, 64, "cudnn"),
    (H100, jnp.float16, 128, 128, "cudnn"),
    (H100, jnp.bfloat16, 256, 256, "cudnn"),
    (A100, jnp.bfloat16, 128, 128, "cudnn"),
    (A100, jnp.bfloat16, 256, 256, "xla"),    # > 128 before Hopper
    (H100, jnp.bfloat16, 264, 264, "xla"),    # > 256
    (H100, jnp.bfloat16, 36, 36, "xla"),      # not a multiple of 8
    (H100, jnp.float32, 64, 64, "xla"),       # cuDNN: bf16/fp16 only
    (H100, jnp.bfloat16, 192, 128, "xla"),    # Dk != Dv
    (da.Backend("cuda"), jnp.bfloat16, 128, 128, "cudnn"),
    (da.Backend("cpu"), jnp.bfloat16, 64, 64, "xla"),
    (da.Backend("tpu"), jnp.bfloat16, 64, 64, "xla"),
    (da.Backend("rocm"), jnp.bfloat16, 64, 64, "xla"),
])
def test_choose_implementation(backend, dtype, head_dim, v_head_dim, want):
  choice = da.choose_implementation(backend, dtype, head_dim, v_head_dim)
  assert choice.implementation == want
  assert choice.reason


def test_reasons_name_the_deciding_fact():
  pick = lambda *a: da.choose_implementation(*a).reason
  assert "cpu" in pick(da.Backend("cpu"), jnp.bfloat16, 64, 64)
  assert "float32" in pick(H100, jnp.float32, 64, 64)
  assert "36" in pick(H100, jnp.bfloat16, 36, 36)
  assert "Dk == Dv" in pick(H100, jnp.bfloat16, 64, 32)


def test_current_backend_on_this_machine():
  backend = da.current_backend()
  assert backend.platform == jax.local_devices()[0].platform or (
      backend.platform in ("cuda", "rocm", "gpu"))
  if jax.default_backend() == "cpu":
    assert backend == da.Backend("cpu")
    assert da.choose_implementation(
        backend, jnp.bfloat16, 64, 64).implementation == "xla"


def _qkv(t, b=2, hq=4, hkv=2, d=16, seed=0):
  rng = np.random.default_rng(seed)
  return (normal(rng, (b, t, hq, d)), normal(rng, (b, t, hkv, d)),
          normal(rng, (b, t, hkv, d)), normal(rng, (b, t, hq, d)))


XLA = functools.partial(jax.nn.dot_product_attention, implementation="xla")


@pytest.mark.parametrize("t", [1, 37, 64, 130])
def test_padding_wrapper_equals_unpadded_attention(t):
  """XLA attention in cuDNN's place: T off 64 padded, forward and VJP."""
  q, k, v, d_out = _qkv(t)
  seen = []

  def fake_cudnn(q, k, v, *, is_causal):
    seen.append(q.shape[1])
    assert q.shape[1] % 64 == 0 and k.shape[1] == q.shape[1]
    return XLA(q, k, v, is_causal=is_causal)

  padded = lambda q, k, v: da.padded_causal_attention(
      q, k, v, attention_fn=fake_cudnn)
  plain = lambda q, k, v: XLA(q, k, v, is_causal=True)

  @functools.partial(jax.jit, static_argnums=0)
  def forward_and_vjp(f, q, k, v, d_out):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(d_out)

  out, grads = forward_and_vjp(padded, q, k, v, d_out)
  want, want_grads = forward_and_vjp(plain, q, k, v, d_out)
  assert seen and seen[0] == -(-t // 64) * 64
  chex.assert_shape(out, q.shape)
  chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-5)


def test_causal_attention_xla_matches_dot_product_attention():
  q, k, v, _ = _qkv(50)
  want = XLA(q, k, v, is_causal=True)
  for impl in ("auto", "xla"):
    got = da.causal_attention(q, k, v, implementation=impl,
                              backend=da.Backend("cpu"))
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_cudnn_where_it_does_not_serve_is_a_clear_error():
  q, k, v, _ = _qkv(8)
  with pytest.raises(ValueError, match="cudnn.*float32"):
    da.causal_attention(q, k, v, implementation="cudnn", backend=H100)
  with pytest.raises(ValueError, match="not one of"):
    da.causal_attention(q, k, v, implementation="flash")


def test_full_attention_module_implementation_argument():
  make = lambda impl: FullAttention(32, 4, 2, 8, implementation=impl,
                                    rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="implementation='flash'"):
    make("flash")
  x = normal(np.random.default_rng(1), (2, 20, 32))
  auto, xla = make("auto")(x), make("xla")(x)
  chex.assert_trees_all_close(auto, xla, rtol=0, atol=0)  # CPU: XLA
  if jax.default_backend() == "cpu":
    with pytest.raises(ValueError, match="does not serve"):
      make("cudnn")(x)


def test_full_attention_docstring_says_what_runs_where():
  doc = FullAttention.__doc__
  for fact in ("cuDNN", "bf16", "XLA", "CPU", "float32", "64"):
    assert fact in doc, fact
