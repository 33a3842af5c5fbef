"""Packed documents (segment ids) through nsa_jax.ops, against the reference.

The rules are docs/SEMANTICS.md, "Packed sequences"; the kernels are tested
with documents in tests/pallas_kernels/test_kernel_documents.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from selection_checks import assert_same_sets_up_to_ties

from nsa_jax import ops
from nsa_jax import reference
from nsa_jax import segments
from nsa_jax.impls import cudnn

from nsa_cases import CASES
from nsa_cases import make_inputs
from nsa_cases import random_block_table
from nsa_cases import TINY
from nsa_cases import TOLERANCE


def _segment_ids(case):
  """int32 [B, T]: row 0 starts documents at 3 (a document shorter than
  l), 16 (on the l' and d edges) and 21, 37 (off them); row 1 at 5, 24, 27
  (a 3-token document) and 44."""
  ids = np.zeros((case.b, case.t), np.int32)
  for row in range(case.b):
    for s in ((3, 16, 21, 37), (5, 24, 27, 44))[row % 2]:
      ids[row, s:] += 1
  return jnp.asarray(ids)


def _close(actual, expected, dtype):
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), actual),
      jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), expected),
      **TOLERANCE[dtype])


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=str)
def test_xla_matches_reference(case):
  """Each op, float32 (the kernels' tests take bfloat16): G = 2, Dk != Dv,
  T = 37 off every block edge; G = 1, T = 5 < l (documents 0..2, 3..4)."""
  dtype = jnp.float32
  x, seg = make_inputs(case, dtype), _segment_ids(case)
  cmp = lambda impl: ops.compressed_attention(
      x["q"], x["k_cmp"], x["v_cmp"], block_size=TINY.cmp_block,
      stride=TINY.cmp_stride, segment_ids=seg, impl=impl)
  (out, lse), (out_ref, lse_ref) = cmp("xla"), cmp("reference")
  _close(out, out_ref, dtype)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_ref))
  _close(jnp.where(jnp.isinf(lse), 0, lse),
         jnp.where(jnp.isinf(lse_ref), 0, lse_ref), dtype)

  scores = ops.block_scores(x["q"], x["k_cmp"], lse_ref, TINY,
                            segment_ids=seg, impl="reference")
  assert_same_sets_up_to_ties(
      ops.select_blocks(x["q"], x["k_cmp"], lse_ref, TINY, segment_ids=seg,
                        impl="xla"),
      reference.select_blocks_reference(x["q"], x["k_cmp"], lse_ref, TINY,
                                        segment_ids=seg), scores)

  table = random_block_table(case, TINY.num_selected, TINY.sel_block)
  for op, kwargs in ((ops.selected_attention,
                      dict(block_indices=table, block_size=TINY.sel_block)),
                     (ops.sliding_window_attention, dict(window=5))):
    run = lambda impl: op(x["q"], x["k"], x["v"], segment_ids=seg,
                          impl=impl, **kwargs)  # pylint: disable=cell-var-from-loop
    _close(run("xla"), run("reference"), dtype)


def test_pallas_path_passes_the_documents():
  """The Pallas adapters (interpret mode here) turn ids into starts.

  Non-finite keys poison only the queries that see them: a NaN raw key at
  position 1 (row 0's first document, positions 0..2) and a NaN compressed
  value at token 1 (keys 4..11, inside the document 3..15: seen by
  t = 11..15).
  """
  case = CASES[0]
  x, seg = make_inputs(case), _segment_ids(case)
  k = x["k"].at[0, 1, 0, 0].set(jnp.nan)
  v_cmp = x["v_cmp"].at[0, 1, 0, 0].set(jnp.nan)
  run = lambda impl: ops.nsa_attention(
      x["q"], k, x["v"], x["gates"], TINY, k_cmp=x["k_cmp"], v_cmp=v_cmp,
      segment_ids=seg, impl=impl)
  got = run("pallas")
  _close(got, run("reference"), jnp.float32)
  nan_rows = np.isnan(np.asarray(got[0, :, :2])).any(axis=(1, 2))
  assert np.flatnonzero(nan_rows).tolist() == [1, 2, 11, 12, 13, 14, 15]


def test_forced_blocks_of_a_document_starting_mid_block():
  """A document from position 20 (inside block 1, l' = 16): its queries
  in block 2 have candidates {1, 2}, both forced (the document's first
  block, and the local ones); a query of the first document keeps
  {0, 1}."""
  ids = jnp.asarray(np.repeat([0, 1], [20, 28])[None])
  q = jax.random.normal(jax.random.key(0), (1, 48, 2, 8))
  k_cmp = jax.random.normal(jax.random.key(1),
                            (1, TINY.num_compressed(48), 1, 8))
  _, lse = ops.compressed_attention(
      q, k_cmp, k_cmp, block_size=TINY.cmp_block, stride=TINY.cmp_stride,
      segment_ids=ids, impl="xla")
  table = np.asarray(ops.select_blocks(q, k_cmp, lse, TINY, segment_ids=ids,
                                       impl="xla"))
  assert sorted(table[0, 47, 0]) == [-1, -1, 1, 2]
  assert sorted(table[0, 19, 0]) == [-1, -1, 0, 1]
  assert sorted(table[0, 20, 0]) == [-1, -1, -1, 1]
  # Without documents t = 47 also has block 0 (forced initial).
  plain = np.asarray(ops.select_blocks(q, k_cmp, lse, TINY, impl="xla"))
  assert 0 in plain[0, 47, 0]


def test_compression_blocks_never_mix_documents():
  """Token i (keys [4i, 4i + 8)) is visible to t iff 4i >= start(t)."""
  ids = jnp.asarray(np.repeat([0, 1], [10, 30])[None])
  visible = np.asarray(reference.compressed_visible(
      40, TINY.num_compressed(40), TINY.cmp_block, TINY.cmp_stride,
      ids))[0, :, 0]
  # Tokens 0, 1 (keys 0..7, 4..11) are the first document's; token 1 and 2
  # (8..15) straddle position 10 and are nobody's; t >= 10 sees tokens
  # 3.. (keys from 12) once complete.
  assert visible[9].tolist()[:3] == [True, False, False]
  assert not visible[:, 1:3].any()
  assert np.flatnonzero(visible[39]).tolist() == list(range(3, 9))


def test_segments_helpers():
  ids = jnp.asarray([[5, 5, 7, 7, 7, 5], [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(segments.document_starts(ids),
                                [[0, 0, 2, 2, 2, 5], [0] * 6])
  np.testing.assert_array_equal(segments.document_index(ids),
                                [[0, 0, 1, 1, 1, 2], [0] * 6])
  np.testing.assert_array_equal(segments.document_positions(ids),
                                [[0, 1, 0, 1, 2, 0], list(range(6))])
  np.testing.assert_array_equal(segments.from_cu_seqlens([0, 2, 2, 6], 6),
                                [[0, 0, 2, 2, 2, 2]])
  for bad in ([1, 6], [0, 4], [0, 4, 3, 6]):
    with pytest.raises(ValueError, match="cu_seqlens"):
      segments.from_cu_seqlens(bad, 6)


def test_bad_segment_ids_are_refused():
  x = make_inputs(CASES[0])
  window = lambda seg: ops.sliding_window_attention(
      x["q"], x["k"], x["v"], window=4, segment_ids=seg)
  with pytest.raises(ValueError, match="segment_ids.shape"):
    window(jnp.zeros((2, 36), jnp.int32))
  with pytest.raises(TypeError, match="segment_ids must be an integer"):
    window(jnp.zeros((2, 37)))


def test_cudnn_window_refuses_documents(monkeypatch):
  """On a GPU cuDNN serves the bf16 window, but not with segment ids: the
  registry then resolves to the Pallas window."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  q, k = spec(1, 128, 4, 64), spec(1, 128, 2, 64)
  ids = jax.ShapeDtypeStruct((1, 128), jnp.int32)
  assert cudnn.supports_window(q, k, k, window=8) is None
  assert "segment ids" in cudnn.supports_window(q, k, k, window=8,
                                                segment_ids=ids)
  kc = spec(1, TINY.num_compressed(128), 2, 64)
  for seg, want in ((None, "cudnn"), (ids, "pallas")):
    for impl in ("auto", "pallas"):
      chosen = ops.resolve_nsa(impl, TINY, q, k, k, kc, kc, segment_ids=seg)
      assert chosen["sliding_window_attention"].name == want
