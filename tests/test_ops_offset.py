"""ops with a query offset: one shard's queries give the whole sequence's rows.

``compressed_attention`` and ``selected_attention`` of the queries at
positions ``o .. o + Tq - 1`` against every key (``q_offset=o``) equal rows
``o .. o + Tq - 1`` of the single-device call (the dense reference), on
every implementation; bad offsets are refused with a message naming them.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import ops
from nsa_jax.config import NSAConfig

from nsa_cases import TOLERANCE

CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3,
                num_initial=1, num_local=1, window=8)
T, HQ, HKV, D = 48, 4, 2, 16


@functools.cache
def _inputs():
  """q, k, v (Dv = 2 Dk), k_cmp, v_cmp and a block table with -1 slots."""
  rng = np.random.default_rng(0)
  tc = CFG.num_compressed(T)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  idx = rng.integers(-1, -(-T // CFG.sel_block), size=(2, T, HKV, 3))
  return (normal(2, T, HQ, D), normal(2, T, HKV, D), normal(2, T, HKV, 2 * D),
          normal(2, tc, HKV, D), normal(2, tc, HKV, 2 * D),
          jnp.asarray(idx, jnp.int32))


@pytest.mark.parametrize("impl", ["xla", "reference", "pallas"])
def test_shard_rows_equal_the_whole_sequence(impl):
  q, k, v, k_cmp, v_cmp, idx = _inputs()
  cmp = functools.partial(ops.compressed_attention, block_size=CFG.cmp_block,
                          stride=CFG.cmp_stride)
  slc = functools.partial(ops.selected_attention, block_size=CFG.sel_block)
  whole_cmp = cmp(q, k_cmp, v_cmp, impl="reference")
  whole_slc = slc(q, k, v, idx, impl="reference")
  # Shards of 8 queries on a block edge (16), off it (21), at the end (40).
  for offset in (16, 21, 40):
    rows = slice(offset, offset + 8)
    out, lse = cmp(q[:, rows], k_cmp, v_cmp, q_offset=offset, impl=impl)
    np.testing.assert_allclose(out, whole_cmp[0][:, rows],
                               **TOLERANCE[jnp.float32])
    np.testing.assert_allclose(lse, whole_cmp[1][:, rows],
                               **TOLERANCE[jnp.float32])
    out = slc(q[:, rows], k, v, idx[:, rows], q_offset=offset, impl=impl)
    np.testing.assert_allclose(out, whole_slc[:, rows],
                               **TOLERANCE[jnp.float32])


def test_bad_offsets_are_refused():
  q, k, v, k_cmp, v_cmp, idx = _inputs()
  seg = jnp.zeros(q[:, :8].shape[:2], jnp.int32)
  cmp = functools.partial(ops.compressed_attention, q[:, :8], k_cmp, v_cmp,
                          block_size=CFG.cmp_block, stride=CFG.cmp_stride)
  slc = functools.partial(ops.selected_attention, q[:, :8], k, v,
                          idx[:, :8], block_size=CFG.sel_block)
  for op in (cmp, slc):
    with pytest.raises(ValueError, match="q_offset=-2 must be >= 0"):
      op(q_offset=-2)
    with pytest.raises(TypeError, match="q_offset must be an int"):
      op(q_offset=2.0)
    with pytest.raises(ValueError, match="segment_ids need the whole"):
      op(q_offset=8, segment_ids=seg)
  with pytest.raises(ValueError, match="need at least 49 keys"):
    slc(q_offset=41)
  with pytest.raises(ValueError, match="k_cmp has 11 compressed tokens but "
                     "queries up to position 55"):
    cmp(q_offset=48)
  with pytest.raises(ValueError, match="disagree on sequence length"):
    ops.selected_attention(q[:, :8], k, v, idx[:, :8],
                           block_size=CFG.sel_block)
