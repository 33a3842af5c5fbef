"""cuDNN's fused attention as an implementation of the window branch.

``jax.nn.dot_product_attention(implementation="cudnn", local_window_size=
(w - 1, 0))`` is dense local attention, which is branch 3 exactly. cuDNN
refuses two things this library allows, so the wrapper pads:

* T not a multiple of 64 (its backward refuses it): q, k, v are padded with
  zeros at the end up to a multiple of 64 and the output sliced back. Padded
  keys lie in the future of every real query, so the causal mask keeps them
  out; padded queries are dropped (their gradient is zero).
* Dk != Dv: q, k and v are zero-padded to one head dim D = max(Dk, Dv)
  rounded up to a multiple of 8. Zero columns change no score q.k (the scale
  is passed explicitly, from the true Dk) and the extra output columns are
  sliced off. Cost: the QK^T matmuls run at D instead of Dk when Dv > Dk, the
  PV matmuls and dV at D instead of Dv when Dk > Dv; for Dk = 192, Dv = 128
  that is D = 192 (> 128, so cuDNN is not offered and the Pallas window
  runs).

Keys a query cannot see must contribute nothing even when they hold NaN or
inf, and cuDNN multiplies masked probabilities (0) by values: rows of k, v
holding a non-finite entry are zeroed first, and a query whose window holds
one gets NaN (a running count over T finds them), as on every path.

It runs on GPUs only; ``sliding_window_attention`` takes the attention call
as an argument so the padding logic is tested on a CPU with the xla window
in its place.

Packed documents: jax's public ``dot_product_attention`` takes no segment
ids (only per-row padding lengths), so a call with ``segment_ids`` is not
served here; the registry sends it to the Pallas window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nsa_jax import xla

DTYPES = (jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 128  # conservative: what every cuDNN 9 build serves
SEQ_MULTIPLE = 64  # the backward's "Unsupported sequence length" rule
HEAD_DIM_MULTIPLE = 8


def padded_sizes(seq_len: int, dk: int, dv: int) -> tuple[int, int]:
  """(T, D) after padding: T up to a multiple of 64, one head dim D."""
  seq = -(-seq_len // SEQ_MULTIPLE) * SEQ_MULTIPLE
  dim = -(-max(dk, dv) // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
  return seq, dim


def supports_window(q, k, v, *, segment_ids=None, **static):
  """None when cuDNN serves this window call, else why not."""
  del static
  if segment_ids is not None:
    return ("jax's cuDNN attention takes no segment ids (packed documents); "
            "the Pallas window does")
  backend = jax.default_backend()
  if backend != "gpu":
    return f"cuDNN needs a GPU backend, this one is {backend!r}"
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) > 1 or dtypes.pop() not in {jnp.dtype(d) for d in DTYPES}:
    return (f"cuDNN takes bfloat16 or float16 q, k, v of one dtype, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}")
  _, dim = padded_sizes(q.shape[1], q.shape[3], v.shape[3])
  if dim > MAX_HEAD_DIM:
    return (f"head dim max(Dk, Dv) padded to {dim} > {MAX_HEAD_DIM}, more "
            "than cuDNN is asked to serve here")
  return None


def cudnn_window(q, k, v, *, window: int, scale: float):
  """The cuDNN call on shapes it accepts (T % 64 == 0, Dk == Dv)."""
  return jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True,
      local_window_size=(window - 1, 0), implementation="cudnn")


def sliding_window_attention(q, k, v, *, window: int, scale: float,
                             attention=cudnn_window):
  """Branch 3 through ``attention`` on padded inputs (see module docstring).

  Args:
    q: [B, T, Hq, Dk]; k: [B, T, Hkv, Dk]; v: [B, T, Hkv, Dv].
    window: w >= 1.
    scale: softmax scale (from the true Dk).
    attention: ``attention(q, k, v, window=, scale=)`` on [B, Tp, H, D]
      inputs with Tp % 64 == 0 and one D; cuDNN's by default.

  Returns:
    [B, T, Hq, Dv] in q.dtype.
  """
  seq_len, dk, dv = q.shape[1], q.shape[3], v.shape[3]
  seq, dim = padded_sizes(seq_len, dk, dv)
  k, v, bad = xla.finite_keys(k, v)

  def pad(x):
    return jnp.pad(x, [(0, 0), (0, seq - seq_len), (0, 0),
                       (0, dim - x.shape[3])])

  # A window longer than T sees the whole causal past: clip it to T.
  out = attention(pad(q), pad(k), pad(v), window=min(window, seq_len),
                  scale=scale)
  out = out[:, :seq_len, :, :dv].astype(q.dtype)
  # Non-finite keys in (t - w, t]: a difference of running counts.
  count = jnp.cumsum(bad.astype(jnp.int32), axis=1)  # [B, T, Hkv]
  before = jnp.pad(count, [(0, 0), (window, 0), (0, 0)])[:, :seq_len]
  sees_bad = jnp.repeat(count - before > 0, q.shape[2] // k.shape[2], axis=2)
  return xla.poison(out, sees_bad)
