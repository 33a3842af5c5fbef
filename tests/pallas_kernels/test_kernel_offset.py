"""The compressed and selected kernels with a query offset vs the XLA path.

A sequence shard's queries (context parallelism) sit at positions
``o .. o + Tq - 1`` of a longer key sequence. ``o`` is a kernel input; it is
traced here, as inside ``shard_map``, so one compiled kernel serves every
offset of a case. Forward and gradients (dq, dk, dv) against
``nsa_jax.xla`` with the same offset, on float32 copies of the inputs.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import xla
from pallas_kernels import compressed_attention
from pallas_kernels import launch_config
from pallas_kernels import selected_attention

import kernel_test_utils as u

L, D, BS = 8, 4, 16  # compressed block l, stride d, selection block l'
NUM_KEYS, NUM_QUERIES = 80, 24  # the whole sequence; one shard's queries
NUM_CMP = (NUM_KEYS - L) // D + 1
# 0 as a kernel input; on a selection block edge (16); off every edge (21,
# 37); 56: the last query is the last key.
OFFSETS = (0, 16, 21, 37, 56)
# Hkv, G, Dk, Dv, dtype. G sets the tiling: positions per tile (16 at
# G 1, one at G 16) and, in the selected kernel, whether rows are masked by
# their position's own table (G < 16).
CASES = [
    pytest.param(2, 1, 16, 16, jnp.float32, id="G1-f32"),
    pytest.param(1, 4, 32, 16, jnp.bfloat16, id="G4-DkDv-bf16"),
    pytest.param(1, 16, 16, 32, jnp.float32, id="G16-DkDv-f32"),
]
# Interpret-mode kernels are large XLA:CPU programs: at LLVM's optimisation
# level 0 they compile in about half the time, and run in milliseconds.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _inputs(num_keys, num_kv_heads, group, dk, dv, dtype, seed=0):
  """q of one shard [2, Tq, Hq, Dk], keys [2, num_keys, Hkv, D], d_out.

  Drawn by NumPy: jax.random, called eagerly, compiles each op alone.
  """
  rng = np.random.default_rng(seed)
  normal = lambda dtype, *shape: jnp.asarray(rng.standard_normal(shape),
                                             dtype)
  hq = num_kv_heads * group
  return (normal(dtype, 2, NUM_QUERIES, hq, dk),
          normal(dtype, 2, num_keys, num_kv_heads, dk),
          normal(dtype, 2, num_keys, num_kv_heads, dv),
          normal(jnp.float32, 2, NUM_QUERIES, hq, dv))


def _out_and_grads(attention, d_out):
  """jit(q, k, v, o) -> (out, lse or None, (dq, dk, dv)) of a weighted sum.

  ``attention(q, k, v, o)`` returns out or (out, lse); a finite lse enters
  the loss too (its cotangent reaches the compressed kernel's backward).
  """
  def loss(q, k, v, o):
    result = attention(q, k, v, o)
    out, lse = result if isinstance(result, tuple) else (result, None)
    total = jnp.sum(out.astype(jnp.float32) * d_out)
    if lse is not None:
      total += jnp.sum(jnp.where(jnp.isfinite(lse), jnp.sin(lse), 0.0))
    return total, (out, lse)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(q, k, v, o):
    (_, (out, lse)), grads = jax.value_and_grad(
        loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, o)
    return out, lse, grads
  return run


def _compare(kernel, xla_path, inputs, d_out, dtype):
  """The kernel against the XLA path on float32 copies, at every offset."""
  up = tuple(x.astype(jnp.float32) for x in inputs)
  for offset in OFFSETS:
    o = jnp.int32(offset)
    out, lse, grads = kernel(*inputs, o)
    want_out, want_lse, want_grads = xla_path(*up, o)
    u.assert_close(out, want_out, dtype)
    if lse is not None:
      np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
      finite = np.isfinite(np.asarray(want_lse))
      u.assert_close(np.where(finite, lse, 0), np.where(finite, want_lse, 0),
                     dtype)
    u.assert_finite(grads)
    u.assert_close(grads, want_grads, dtype, "grad")


@pytest.mark.parametrize("num_kv_heads, group, dk, dv, dtype", CASES)
def test_compressed_attention_offset(num_kv_heads, group, dk, dv, dtype):
  q, k_cmp, v_cmp, d_out = _inputs(NUM_CMP, num_kv_heads, group, dk, dv,
                                   dtype)
  settings = dict(block_size=L, stride=D)
  kernel = _out_and_grads(lambda q, k, v, o: compressed_attention(
      q, k, v, interpret=True, q_offset=o, **settings), d_out)
  xla_path = _out_and_grads(lambda q, k, v, o: xla.compressed_attention(
      q, k, v, scale=dk ** -0.5, q_offset=o, **settings), d_out)
  _compare(kernel, xla_path, (q, k_cmp, v_cmp), d_out, dtype)


def _block_table(num_kv_heads, seed=1):
  """int32 [2, Tq, Hkv, 3]: distinct blocks, future ones too, or -1; query
  row 3 selects nothing."""
  rng = np.random.default_rng(seed)
  num_blocks = -(-NUM_KEYS // BS)
  shape = (2, NUM_QUERIES, num_kv_heads, num_blocks)
  idx = np.argsort(rng.uniform(size=shape), axis=-1)[..., :3]
  idx = np.where(rng.uniform(size=idx.shape) < 0.3, -1, idx)
  idx[:, 3] = -1
  return jnp.asarray(idx, jnp.int32)


@pytest.mark.parametrize("num_kv_heads, group, dk, dv, dtype", CASES)
def test_selected_attention_offset(num_kv_heads, group, dk, dv, dtype):
  q, k, v, d_out = _inputs(NUM_KEYS, num_kv_heads, group, dk, dv, dtype)
  idx = _block_table(num_kv_heads)
  kernel = _out_and_grads(lambda q, k, v, o: selected_attention(
      q, k, v, idx, block_size=BS, interpret=True, q_offset=o), d_out)
  xla_path = _out_and_grads(lambda q, k, v, o: xla.selected_attention(
      q, k, v, idx, block_size=BS, scale=dk ** -0.5, q_offset=o), d_out)
  _compare(kernel, xla_path, (q, k, v), d_out, dtype)


def test_bad_offsets_are_named():
  q, k, v, _ = _inputs(NUM_KEYS, 1, 2, 16, 16, jnp.float32)
  k_cmp, v_cmp = k[:, :NUM_CMP], v[:, :NUM_CMP]
  idx = _block_table(1)
  starts = jnp.zeros(q.shape[:2], jnp.int32)
  selected = functools.partial(selected_attention, q, k, v, idx,
                               block_size=BS, interpret=True)
  compressed = functools.partial(compressed_attention, q, k_cmp, v_cmp,
                                 block_size=L, stride=D, interpret=True)
  with pytest.raises(ValueError, match="need Tk >= 81 keys"):
    selected(q_offset=57)
  with pytest.raises(ValueError, match="q_offset=-1 must be >= 0"):
    selected(q_offset=-1)
  with pytest.raises(TypeError, match="integer scalar"):
    selected(q_offset=jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="not with window or doc_starts"):
    selected(q_offset=8, doc_starts=starts)
  with pytest.raises(ValueError, match="not with window or doc_starts"):
    selected(q_offset=8, window=4)
  with pytest.raises(ValueError, match="give q_offset"):
    selected_attention(q, k[:, :40], v[:, :40], idx, block_size=BS)
  with pytest.raises(ValueError, match="k_cmp holds only Tc=19"):
    compressed(q_offset=70)
  with pytest.raises(ValueError, match="doc_starts need the whole sequence"):
    compressed(q_offset=8, doc_starts=starts)
  with pytest.raises(TypeError, match="integer scalar"):
    compressed(q_offset=1.5)


@pytest.mark.lowering
def test_offset_kernels_lower_to_triton():
  """Forward and backward of both kernels with a traced offset input."""
  q, k, v, d_out = _inputs(NUM_KEYS, 1, 4, 32, 16, jnp.bfloat16)
  idx = _block_table(1)

  def loss(q, k, v, k_cmp, v_cmp, o):
    slc = selected_attention(q, k, v, idx, block_size=BS, interpret=False,
                             q_offset=o)
    cmp, _ = compressed_attention(q, k_cmp, v_cmp, block_size=L, stride=D,
                                  interpret=False, q_offset=o)
    return jnp.sum((slc + cmp).astype(jnp.float32) * d_out)

  u.lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), q, k, v,
                   k[:, :NUM_CMP], v[:, :NUM_CMP], jnp.int32(21))


def test_dkv_segments_shrink_with_longer_keys():
  """Fewer dK/dV segments when Tk > T: partials of <= 8 T key rows."""
  seg = launch_config.selected_segment
  assert seg(4096, 64) == seg(4096, 64, num_keys=4096) == 512  # 8 segments
  assert seg(4096, 64, num_keys=8192) == 1024  # 4 segments of 8192 keys
  assert seg(4096, 64, num_keys=32768) == 4096  # 1 segment (8 shards)
  assert seg(4096, 64, num_keys=10**6) == 4096


def test_block_table_inverted_without_packed_keys(monkeypatch):
  """Past int32 (block * T + t), sorting (block, t) pairs: the same table."""
  module = sys.modules["pallas_kernels.selected_attention"]
  idx = _block_table(2)
  # A new jit each time: the limit is read when tracing.
  invert = lambda: jax.jit(module._invert_block_table, static_argnums=(1, 2))(
      idx, -(-NUM_KEYS // BS), 4)
  packed = invert()
  monkeypatch.setattr(module, "PACKED_KEY_LIMIT", 1)
  pairs = invert()
  for a, b in zip(packed, pairs):
    np.testing.assert_array_equal(a, b)
