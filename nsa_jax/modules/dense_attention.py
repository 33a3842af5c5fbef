"""Dense causal attention of FullAttention: cuDNN where it serves, else XLA.

What runs where (``choose_implementation`` decides, from static facts only):

- NVIDIA GPU (CUDA), bf16 or fp16, Dk == Dv, head dim a multiple of 8 and at
  most 256 on Hopper and later (128 before): cuDNN's fused flash attention,
  ``jax.nn.dot_product_attention(implementation="cudnn")``. It keeps O(T)
  state instead of the ``T x T`` scores. Its backward refuses a sequence
  length that is not a multiple of 64 ("Unsupported sequence length"), so
  ``padded_causal_attention`` pads T up to a multiple of 64 with zero rows
  at the end (keys the causal mask hides from every real query, queries
  whose outputs are sliced off) and slices the result back.
- Everywhere else (CPU, TPU, ROCm, float32, other head dims): XLA's
  attention, ``implementation="xla"``, which materialises ``T x T`` scores
  per head (fine for short T; at 8k+ in training it runs out of memory on
  an 80 GB GPU).

Packed documents (``segment_ids``, int [B, T]; a document is a run of equal
ids, ``nsa_jax.segments``): a query attends to the keys s <= t of its own
document. jax's public cuDNN call takes no segment ids, so on an NVIDIA GPU
such a call runs jax's Pallas Triton flash attention (``"pallas"``,
``jax.experimental.pallas.ops.gpu.attention.mha``, which masks segments per
tile, O(T) memory; its backward is slower than cuDNN's, PALLAS_TRITON.md);
elsewhere XLA's attention with a ``[B, 1, T, T]`` document mask.

The dtype and head-dim limits are those jax checks before it calls cuDNN
(``check_is_flash_attention``, read in jax 0.10.2); the backward's T rule was
measured on an H100 with jax 0.11.2.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools

import jax
import jax.numpy as jnp

from nsa_jax import segments

IMPLEMENTATIONS = ("auto", "cudnn", "pallas", "xla")
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_SEQ_MULTIPLE = 64  # cuDNN's backward refuses other sequence lengths
PALLAS_BLOCK = 128  # sequence tile of jax's Pallas flash attention


@dataclasses.dataclass(frozen=True)
class Choice:
  """Which dense attention runs, and why.

  Attributes:
    implementation: "cudnn", "pallas" or "xla".
    reason: one line naming the fact that decided it.
  """

  implementation: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Backend:
  """The facts about the device that matter to the choice.

  Attributes:
    platform: "cuda" for an NVIDIA GPU; otherwise jax's platform name
      ("cpu", "tpu", "rocm", ...).
    compute_capability: (major, minor) of an NVIDIA GPU, else None.
  """

  platform: str
  compute_capability: tuple[int, int] | None = None


def current_backend() -> Backend:
  """The backend of ``jax.local_devices()[0]``."""
  device = jax.local_devices()[0]
  if device.platform != "gpu":
    return Backend(device.platform)
  version = str(getattr(device.client, "platform_version", "")).lower()
  if "cuda" not in version:
    return Backend("rocm" if "rocm" in version else "gpu")
  capability = getattr(device, "compute_capability", None)
  if capability:
    major, minor = (int(p) for p in str(capability).split(".")[:2])
    return Backend("cuda", (major, minor))
  return Backend("cuda")


def cudnn_max_head_dim(compute_capability: tuple[int, int] | None) -> int:
  """256 on Hopper (sm90) and later, 128 before (jax's own check)."""
  return 256 if compute_capability and compute_capability >= (9, 0) else 128


def choose_implementation(backend: Backend, dtype, head_dim: int,
                          v_head_dim: int, documents: bool = False) -> Choice:
  """cuDNN flash attention where it serves these inputs, else XLA.

  Args:
    backend: the device (``current_backend()``).
    dtype: dtype of q, k and v.
    head_dim: Dk. v_head_dim: Dv.
    documents: the call has segment ids (packed documents): cuDNN cannot
      take them, jax's Pallas flash attention serves on an NVIDIA GPU.

  Returns:
    A ``Choice`` with the implementation and the reason.
  """
  name = jnp.dtype(dtype).name
  if backend.platform != "cuda":
    return Choice("xla", f"cuDNN needs an NVIDIA GPU, the backend is "
                  f"{backend.platform}")
  if documents:
    if head_dim != v_head_dim:
      return Choice("xla", f"jax's Pallas flash attention needs Dk == Dv, "
                    f"got {head_dim} and {v_head_dim}")
    return Choice("pallas", "segment ids: jax's cuDNN call takes none, its "
                  "Pallas flash attention masks documents")
  if name not in CUDNN_DTYPES:
    return Choice("xla", f"cuDNN serves {'/'.join(CUDNN_DTYPES)}, not {name}")
  if head_dim != v_head_dim:
    return Choice("xla", f"cuDNN needs Dk == Dv, got {head_dim} and "
                  f"{v_head_dim}")
  limit = cudnn_max_head_dim(backend.compute_capability)
  if head_dim % 8 or head_dim > limit:
    return Choice("xla", f"cuDNN needs a head dim that is a multiple of 8 and "
                  f"<= {limit} here, got {head_dim}")
  return Choice("cudnn", f"{name} on CUDA, head dim {head_dim}")


def padded_causal_attention(q, k, v, *, attention_fn: Callable[..., jax.Array],
                            multiple: int = CUDNN_SEQ_MULTIPLE) -> jax.Array:
  """Causal ``attention_fn`` on T padded up to a multiple of ``multiple``.

  Zero rows appended at the end change nothing a real query sees: the causal
  mask hides keys at positions >= T from queries at positions < T, and the
  padded queries' outputs are sliced off (so their gradient is zero).

  Args:
    q: [B, T, Hq, D]. k, v: [B, T, Hkv, D].
    attention_fn: ``f(q, k, v, is_causal=True) -> [B, T', Hq, D]``, e.g.
      ``jax.nn.dot_product_attention`` with ``implementation="cudnn"``.
    multiple: the padded length is the next multiple of this.

  Returns:
    [B, T, Hq, D] in q.dtype.
  """
  t = q.shape[1]
  pad = -t % multiple
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
  out = attention_fn(q, k, v, is_causal=True)  # [B, T + pad, Hq, D]
  return out[:, :t]


def pallas_causal_attention(q, k, v, segment_ids=None, *,
                            block: int = PALLAS_BLOCK,
                            interpret: bool | None = None) -> jax.Array:
  """jax's Pallas Triton flash attention, causal, with optional documents.

  GQA by repeating the K/V heads (the kernel takes one head count); T is
  padded up to a multiple of ``block`` with zero rows at the end, in the
  future of every real query (and a document of their own); their outputs
  are sliced off.

  Args:
    q: [B, T, Hq, D]. k, v: [B, T, Hkv, D].
    segment_ids: optional int [B, T].
    block: the kernel's sequence tile, forward and backward.
    interpret: Pallas interpret mode; None: when no GPU is present.

  Returns:
    [B, T, Hq, D] in q.dtype.
  """
  # Imported here: a deprecated module (PALLAS_TRITON.md) that only this
  # path needs.
  from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
  b, t, hq, d = q.shape
  group = hq // k.shape[2]
  k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
  pad = -t % block
  ids = None
  if segment_ids is not None:
    ids = jnp.pad(segments.document_index(segment_ids), ((0, 0), (0, pad)),
                  constant_values=t)
  q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  out = attention.mha(
      q, k, v, ids, sm_scale=d ** -0.5, causal=True, interpret=interpret,
      block_sizes=attention.BlockSizes(
          block_q=block, block_k=block, block_q_dkv=min(block, 32),
          block_kv_dkv=min(block, 32), block_q_dq=min(block, 32),
          block_kv_dq=min(block, 32)))
  return out[:, :t]


def _document_mask(segment_ids):
  """bool [B, 1, T, T]: key s is in query t's document."""
  doc = segments.document_index(segment_ids)
  return (doc[:, :, None] == doc[:, None, :])[:, None]


def causal_attention(q, k, v, *, segment_ids=None,
                     implementation: str = "auto",
                     backend: Backend | None = None) -> jax.Array:
  """Dense causal GQA attention, softmax scale 1 / sqrt(D).

  Args:
    q: [B, T, Hq, D]. k, v: [B, T, Hkv, D], Hq a multiple of Hkv.
    segment_ids: optional int [B, T] (packed documents): query t attends to
      the keys s <= t of its own document only.
    implementation: "auto" (``choose_implementation``), "cudnn" (raises
      where cuDNN does not serve these inputs, segment ids included),
      "pallas" (``pallas_causal_attention``; interpret mode off a GPU) or
      "xla".
    backend: the device, default ``current_backend()``.

  Returns:
    [B, T, Hq, D] in q.dtype.

  Raises:
    ValueError: an unknown implementation, or "cudnn" where it does not
      serve (the message says why).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of "
                     f"{IMPLEMENTATIONS}")
  documents = segment_ids is not None
  if implementation in ("auto", "cudnn"):
    choice = choose_implementation(backend or current_backend(), q.dtype,
                                   q.shape[-1], v.shape[-1], documents)
    if implementation == "cudnn" and choice.implementation != "cudnn":
      raise ValueError(f"implementation='cudnn' does not serve these inputs: "
                       f"{choice.reason}")
    implementation = choice.implementation
  if implementation == "cudnn":
    return padded_causal_attention(q, k, v, attention_fn=functools.partial(
        jax.nn.dot_product_attention, implementation="cudnn"))
  if implementation == "pallas":
    return pallas_causal_attention(q, k, v, segment_ids)
  mask = _document_mask(segment_ids) if documents else None
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                      implementation="xla")
