"""Branch 3: the Pallas window (selected kernel) and cuDNN's padded window."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import ops
from nsa_jax import reference
from nsa_jax import xla
from nsa_jax.impls import cudnn
from pallas_kernels import sliding_window_attention
from pallas_kernels.sliding_window import window_block_table

import kernel_test_utils as u


def _inputs(seq_len, group, dk, dv, dtype):
  rng = np.random.default_rng(0)
  q = u.normal(rng, (1, seq_len, 2 * group, dk), dtype)
  k = u.normal(rng, (1, seq_len, 2, dk), dtype)
  v = u.normal(rng, (1, seq_len, 2, dv), dtype)
  d_out = u.normal(rng, (1, seq_len, 2 * group, dv), jnp.float32)
  return q, k, v, d_out


def _check_against_reference(kernel, window, q, k, v, d_out, dtype):
  out, grads = u.output_and_grads(kernel, d_out)(q, k, v)
  ref = functools.partial(reference.sliding_window_attention_reference,
                          window=window)
  want, want_grads = u.output_and_grads(ref, d_out)(q, k, v)
  u.assert_close(out, want, dtype)
  u.assert_finite(grads)
  u.assert_close(grads, want_grads, dtype, "grad")


class SlidingWindowCases:
  """The Pallas window's tests; subclasses say whether it is interpreted."""

  INTERPRET = True

  @pytest.mark.parametrize("window,group,dtype", [
      (1, 2, jnp.float32),  # only the query's own key
      (8, 1, jnp.float32),
      (20, 4, jnp.bfloat16),  # window wider than one key block
      (5, 2, jnp.float16),
  ])
  def test_forward_and_gradients(self, window, group, dtype):
    q, k, v, d_out = _inputs(37, group, 16, 24, dtype)
    kernel = functools.partial(sliding_window_attention, window=window,
                               interpret=self.INTERPRET)
    _check_against_reference(kernel, window, q, k, v, d_out, dtype)

  def test_deterministic(self):
    q, k, v, d_out = _inputs(37, 2, 16, 16, jnp.bfloat16)
    kernel = functools.partial(sliding_window_attention, window=20,
                               interpret=self.INTERPRET)
    run = u.output_and_grads(kernel, d_out)
    u.assert_bitwise_equal(run(q, k, v), run(q, k, v))


class TestSlidingWindowInterpret(SlidingWindowCases):
  INTERPRET = True


@pytest.mark.gpu
class TestSlidingWindowGpu(SlidingWindowCases):
  INTERPRET = False


@pytest.mark.parametrize("seq_len,window,block", [(37, 8, 16), (70, 20, 16),
                                                  (50, 64, 64)])
def test_block_table_covers_exactly_the_window(seq_len, window, block):
  table = np.asarray(window_block_table(seq_len, window, block))
  for t in range(seq_len):
    want = set(range(max(0, t - window + 1) // block, t // block + 1))
    got = set(table[t][table[t] >= 0].tolist())
    assert got == want, t


def _xla_in_cudnns_place(q, k, v, *, window, scale):
  """Stands in for cuDNN on a CPU, holding the wrapper to cuDNN's rules."""
  assert q.shape[1] % cudnn.SEQ_MULTIPLE == 0, q.shape
  assert q.shape[3] == k.shape[3] == v.shape[3], (q.shape, v.shape)
  assert q.shape[3] % cudnn.HEAD_DIM_MULTIPLE == 0, q.shape
  assert window <= q.shape[1]
  return xla.sliding_window_attention(q, k, v, window=window, scale=scale)


@pytest.mark.parametrize("seq_len,dk,dv,window", [
    (37, 16, 24, 8),  # T % 64 != 0, Dv > Dk
    (64, 24, 12, 3),  # T on the edge, Dk > Dv, Dv off a multiple of 8
    (70, 16, 16, 200),  # window longer than T
])
def test_cudnn_padding(seq_len, dk, dv, window):
  """cuDNN's wrapper pads T and head dims and slices back, exactly."""
  q, k, v, d_out = _inputs(seq_len, 2, dk, dv, jnp.float32)
  kernel = functools.partial(cudnn.sliding_window_attention, window=window,
                             scale=dk ** -0.5, attention=_xla_in_cudnns_place)
  _check_against_reference(lambda q, k, v: kernel(q, k, v), window, q, k, v,
                           d_out, jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len,dk,dv,window", [(37, 16, 24, 8),
                                                  (100, 64, 64, 20)])
def test_cudnn_on_gpu(seq_len, dk, dv, window):
  q, k, v, d_out = _inputs(seq_len, 2, dk, dv, jnp.bfloat16)
  kernel = functools.partial(ops.sliding_window_attention, window=window,
                             impl="cudnn")
  _check_against_reference(kernel, window, q, k, v, d_out, jnp.bfloat16)


def test_cudnn_offered_only_where_it_serves(monkeypatch):
  q, k, v, _ = _inputs(20, 1, 16, 16, jnp.bfloat16)
  on_gpu = jax.default_backend() == "gpu"
  assert (cudnn.supports_window(q, k, v) is None) == on_gpu
  reasons = ops.implementations("sliding_window_attention", q, k, v,
                                window=4)
  assert reasons["auto"] == ("cudnn" if on_gpu else "xla")
  if not on_gpu:
    with pytest.raises(ValueError, match="cuDNN needs a GPU"):
      ops.sliding_window_attention(q, k, v, window=4, impl="cudnn")
  with pytest.raises(ValueError, match="implementation"):
    sliding_window_attention(q, k, v, window=4, implementation="flash")
  # What a GPU backend would say about other calls.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert cudnn.supports_window(q, k, v) is None
  as32 = [x.astype(jnp.float32) for x in (q, k, v)]
  assert "bfloat16 or float16" in cudnn.supports_window(*as32)
  q_big, k_big, v_big, _ = _inputs(20, 1, 136, 16, jnp.bfloat16)
  assert "136 > 128" in cudnn.supports_window(q_big, k_big, v_big)
  chosen = ops.WINDOW.resolve("auto", *as32, window=4, scale=None)
  assert chosen.name == "pallas"
