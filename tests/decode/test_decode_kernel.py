"""The Pallas block-sparse decode kernel: interpret mode and Triton lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import decode
from nsa_jax.decode import cache as cache_lib
from pallas_kernels import decode_attention as kernel

from nsa_cases import normal

BLOCK = 16

# Jitted, settings static: one compiled program per call, where eager calls
# run the glue around the kernel and the references op by op.
_kernel = jax.jit(kernel.block_sparse_decode, static_argnames=(
    "block_size", "window", "ring", "num_splits", "interpret"))
_reference = jax.jit(kernel.block_sparse_decode_reference,
                     static_argnames=("block_size", "window", "ring"))
_xla = jax.jit(decode.block_sparse_decode, static_argnames=("block_size",))


def _inputs(b, size, hkv, group, dk, dv, n, dtype=jnp.float32, seed=0):
  """Random q/k/v, a repeat-free table (some -1, some future blocks), NaN
  and inf garbage past each row's length."""
  rng = np.random.default_rng(seed)
  q = normal(rng, (b, hkv * group, dk), dtype)
  k = normal(rng, (b, size, hkv, dk), dtype)
  v = normal(rng, (b, size, hkv, dv), dtype)
  lengths = rng.integers(1, size + 1, b).astype(np.int32)
  lengths[0] = size
  table = np.full((b, hkv, n), -1, np.int32)
  for index in np.ndindex(b, hkv):
    count = rng.integers(0, n + 1)
    table[index][:count] = rng.choice(size // BLOCK, count, replace=False)
  table[-1, 0] = -1  # a row that sees nothing
  lengths = jnp.asarray(lengths)
  valid = jnp.arange(size)[None, :, None, None] < lengths[:, None, None, None]
  clean = (k, v)
  dirty = (jnp.where(valid, k, jnp.nan), jnp.where(valid, v, jnp.inf))
  return q, clean, dirty, jnp.asarray(table), lengths


@pytest.mark.parametrize("b,size,hkv,group,dk,dv,n,splits", [
    (3, 64, 2, 2, 16, 16, 3, None),  # G padded 2 -> 16
    (2, 96, 1, 16, 8, 12, 5, 2),  # Dk, Dv padded; uneven split of 5 slots
    (2, 64, 2, 4, 16, 32, 4, 4),  # one slot per program
    (1, 128, 1, 32, 16, 16, 8, 1),  # G 32, no split
])
def test_interpret_mode_equals_xla_path_and_reference(b, size, hkv, group, dk,
                                                      dv, n, splits):
  q, (k, v), (k_bad, v_bad), table, lengths = _inputs(b, size, hkv, group,
                                                      dk, dv, n)
  out, lse = _kernel(q, k_bad, v_bad, table, lengths, block_size=BLOCK,
                     num_splits=splits, interpret=True)
  xla_out, xla_lse = _xla(q, k_bad, v_bad, table, lengths, block_size=BLOCK)
  ref_out, ref_lse = _reference(q, k, v, table, lengths, block_size=BLOCK)
  tol = dict(atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(out, xla_out, **tol)
  np.testing.assert_allclose(lse, xla_lse, **tol)
  np.testing.assert_allclose(out, ref_out, **tol)
  np.testing.assert_allclose(lse, ref_lse, **tol)
  assert np.isfinite(np.asarray(out)).all()
  assert np.isneginf(np.asarray(lse[-1, :group])).all()  # empty table row


def test_bfloat16_is_close_to_the_float32_reference():
  q, _, (k, v), table, lengths = _inputs(2, 64, 2, 4, 16, 16, 3,
                                         dtype=jnp.bfloat16, seed=3)
  out, lse = _kernel(q, k, v, table, lengths, block_size=BLOCK,
                     interpret=True)
  assert out.dtype == jnp.bfloat16
  f32 = lambda x: jnp.where(jnp.isfinite(x), x, 0).astype(jnp.float32)
  ref_out, ref_lse = _reference(q.astype(jnp.float32), f32(k), f32(v), table,
                                lengths, block_size=BLOCK)
  np.testing.assert_allclose(out.astype(jnp.float32), ref_out, atol=3e-2,
                             rtol=3e-2)
  np.testing.assert_allclose(lse, ref_lse, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton(dtype):
  q, _, (k, v), table, lengths = _inputs(2, 128, 2, 8, 64, 64, 6, dtype)
  fn = lambda q, k, v, table, lengths: kernel.block_sparse_decode(
      q, k, v, table, lengths, block_size=64, num_splits=2, interpret=False)
  lowered = jax.jit(fn).trace(q, k, v, table, lengths).lower(
      lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "xla.gpu.triton" in text and "block_sparse_decode" in text


def test_bad_settings_are_clear_errors():
  q, (k, v), _, table, lengths = _inputs(1, 64, 1, 2, 16, 16, 2)
  with pytest.raises(ValueError, match="power of two >= 16"):
    kernel.block_sparse_decode(q, k, v, table, lengths, block_size=8)
  with pytest.raises(ValueError, match="num_splits=3"):
    kernel.block_sparse_decode(q, k, v, table, lengths, block_size=16,
                               num_splits=3)
  with pytest.raises(ValueError, match="block_table.shape"):
    kernel.block_sparse_decode(q, k, v, table[:, :, None], lengths,
                               block_size=16)


@pytest.mark.parametrize("ring", [False, True])
@pytest.mark.parametrize("window", [None, 20, 40])
def test_window_and_ring_modes_equal_the_reference(window, ring):
  # A ring of S = 48 slots; rows at lengths 5 (slots unused), 48 and 100
  # (wrapped twice); the table names every block, as the window branch.
  q, (k, v), _, _, _ = _inputs(3, 48, 2, 4, 16, 16, 3, seed=5)
  lengths = jnp.array([5, 48, 100], jnp.int32)
  if not ring:
    lengths = jnp.minimum(lengths, 48)
  table = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (3, 2, 3))
  out, lse = _kernel(q, k, v, table, lengths, block_size=BLOCK,
                     window=window, ring=ring, num_splits=2, interpret=True)
  ref_out, ref_lse = _reference(q, k, v, table, lengths, block_size=BLOCK,
                                window=window, ring=ring)
  np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=2e-5)
  if ring:  # the XLA path over the same ring, by explicit slot positions
    pos = cache_lib.ring_positions(lengths, 48)
    want = decode.attention.attend_by_position(
        q[:, None], k, v, pos, (lengths - 1)[:, None], window=window)[0]
    np.testing.assert_allclose(out, want[:, 0], atol=2e-5, rtol=2e-5)


def test_two_sources_in_one_launch_equal_separate_calls():
  # NSA's selected blocks and its window ring: different S, n, window and
  # ring settings in one grid; each result equals its own call.
  q, (k, v), _, table, lengths = _inputs(3, 96, 2, 4, 16, 16, 3, seed=7)
  ring_k, ring_v = k[:, :48], v[:, :48]
  ring_table = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (3, 2, 3))
  sources = [kernel.Source(k, v, table, num_splits=2),
             kernel.Source(ring_k, ring_v, ring_table, window=40, ring=True)]
  got = jax.jit(lambda q, lengths: kernel.block_sparse_decode_many(
      q, sources, lengths, block_size=BLOCK, interpret=True))(q, lengths)
  want = [_kernel(q, k, v, table, lengths, block_size=BLOCK, num_splits=2,
                  interpret=True),
          _kernel(q, ring_k, ring_v, ring_table, lengths, block_size=BLOCK,
                  window=40, ring=True, interpret=True)]
  for (out, lse), (want_out, want_lse) in zip(got, want):
    np.testing.assert_allclose(out, want_out, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(lse, want_lse, atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="sources differ"):
    kernel.block_sparse_decode_many(
        q, [sources[0], kernel.Source(k[..., :8], v, table)], lengths,
        block_size=BLOCK)
