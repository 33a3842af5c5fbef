"""Every kernel with packed documents (doc_starts) vs the dense reference.

Document starts on and off block edges, documents shorter than l and than a
query tile, T off every block edge, G = 2, 4, 16 (and 1 in the lowering),
float32 and bfloat16; forward and gradients (dq, dk, dv, and d k_cmp,
d v_cmp through branch 1); the Triton lowering with documents.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from selection_checks import assert_same_sets_up_to_ties

from nsa_jax import reference
from nsa_jax import segments
from nsa_jax import selection
from nsa_jax.config import NSAConfig
import pallas_kernels as pk

import kernel_test_utils as u

CFG = NSAConfig.tiny()  # l = 8, d = 4, l' = 16, n = 4, w = 32
T = 45
# l = 4, d = 2, l' = 4: a score step (16 blocks) spans 64 positions.
SMALL = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, num_selected=4,
                  window=8)


def _segment_ids(seq_len=T, starts=(5, 16, 21, 37, 42)):
  """int32 [1, T]: documents start at 0 and at ``starts``. The defaults: a
  first document of 5 < l tokens (no compressed token), a start on the l'
  and d edges (16), starts off every edge, a 3-token document (37..39) and
  a last one (42..) shorter than l."""
  ids = np.zeros((1, seq_len), np.int32)
  for s in starts:
    ids[0, s:] += 1
  return jnp.asarray(ids)


def _qkv(seq_len, num_kv, group, dk, dv, dtype, num_keys=None, seed=0):
  """q [1, T, Hq, Dk], k/v [1, num_keys (T), Hkv, D], float32 cotangent."""
  rng = np.random.default_rng(seed)
  num_keys = seq_len if num_keys is None else num_keys
  return (u.normal(rng, (1, seq_len, num_kv * group, dk), dtype),
          u.normal(rng, (1, num_keys, num_kv, dk), dtype),
          u.normal(rng, (1, num_keys, num_kv, dv), dtype),
          u.normal(rng, (1, seq_len, num_kv * group, dv), jnp.float32))


def _check(kernel, ref, args, d_out, dtype):
  """Forward and gradients of ``kernel`` against ``ref``; either returns
  out or (out, lse), whose lse (finite rows) enters the loss too.

  Returns:
    The kernel's forward output.
  """
  result, grads = u.output_and_grads(kernel, d_out)(*args)
  want, want_grads = u.output_and_grads(ref, d_out)(*args)
  got = result
  if isinstance(got, tuple):
    np.testing.assert_array_equal(np.isneginf(got[1]), np.isneginf(want[1]))
    finite = np.isfinite(np.asarray(want[1]))
    got = (got[0], np.where(finite, got[1], 0))
    want = (want[0], np.where(finite, want[1], 0))
  u.assert_close(got, want, dtype)
  u.assert_finite(grads)
  u.assert_close(grads, want_grads, dtype, "grad")
  return result


def _select(q, k_cmp, lse, interpret, config=CFG, **kwargs):
  return pk.select_blocks(
      q, k_cmp, lse, cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
      sel_block=config.sel_block, num_selected=config.num_selected,
      num_initial=config.num_initial, num_local=config.num_local,
      interpret=interpret, **kwargs)


def _scores(q, k_cmp, lse, interpret, config=CFG, **kwargs):
  return pk.block_scores(q, k_cmp, lse, cmp_block=config.cmp_block,
                         cmp_stride=config.cmp_stride,
                         sel_block=config.sel_block, interpret=interpret,
                         **kwargs)


class DocumentsCases:
  """The kernels' document tests; subclasses say whether they interpret."""

  INTERPRET = True

  def test_selected_attention(self):
    """G = 2, float32: tiles of several positions (the union loop)."""
    seg = _segment_ids()
    q, k, v, d_out = _qkv(T, 1, 2, 16, 16, jnp.float32)
    num_blocks = -(-T // CFG.sel_block)
    # Every block in some slot, future ones included: the kernel masks
    # s > t and keys of other documents itself.
    idx = jnp.broadcast_to(jnp.arange(num_blocks, dtype=jnp.int32),
                           (1, T, 1, num_blocks))
    idx = jnp.where(jnp.arange(T)[None, :, None, None] % 3 == 0, -1, idx)
    kernel = lambda q, k, v: pk.selected_attention(
        q, k, v, idx, block_size=CFG.sel_block, interpret=self.INTERPRET,
        doc_starts=segments.document_starts(seg))
    ref = lambda q, k, v: reference.selected_attention_reference(
        q, k, v, idx, block_size=CFG.sel_block, segment_ids=seg)
    _check(kernel, ref, (q, k, v), d_out, jnp.float32)

  def test_sliding_window(self):
    """G = 16: one position per tile."""
    seg = _segment_ids()
    q, k, v, d_out = _qkv(T, 1, 16, 16, 8, jnp.bfloat16)
    kernel = lambda q, k, v: pk.sliding_window_attention(
        q, k, v, window=20, interpret=self.INTERPRET,
        doc_starts=segments.document_starts(seg))
    ref = lambda q, k, v: reference.sliding_window_attention_reference(
        q, k, v, window=20, segment_ids=seg)
    _check(kernel, ref, (q, k, v), d_out, jnp.bfloat16)

  def test_compressed_scores_and_selection(self):
    """Branch 1 (G = 4, bf16), then scores and top-n (float32 copies).

    l = 4, d = 2, l' = 4, T = 83; documents from 0 (3 tokens < l), 3, 40
    (on the block edges), 41 (1 token), 42 and 66 (off the l' edge). Tiles
    of 16 queries skip the first chunk of 16 compressed tokens (positions
    < 32) and the first score step (blocks of positions < 64).
    """
    seq_len, tc = 83, SMALL.num_compressed(83)
    seg = _segment_ids(seq_len, (3, 40, 41, 42, 66))
    starts = segments.document_starts(seg)
    q, k, v, d_out = _qkv(seq_len, 1, 4, 16, 24, jnp.bfloat16, num_keys=tc)
    kernel = functools.partial(
        pk.compressed_attention, block_size=SMALL.cmp_block,
        stride=SMALL.cmp_stride, interpret=self.INTERPRET, block_q=16,
        block_k=16, doc_starts=starts)
    ref = functools.partial(reference.compressed_attention_reference,
                            block_size=SMALL.cmp_block,
                            stride=SMALL.cmp_stride, segment_ids=seg)
    out, lse = _check(kernel, ref, (q, k, v), d_out, jnp.bfloat16)
    assert np.all(np.asarray(out[0, :3]) == 0)  # a document shorter than l
    assert np.all(np.isneginf(np.asarray(lse[0, :3])))

    @jax.jit
    def kernels_and_xla(q, k, v):
      _, lse = ref(q, k, v)
      launch = pk.ScoreLaunch(block_q=16)
      return (_scores(q, k, lse, self.INTERPRET, SMALL, doc_starts=starts,
                      launch=launch),
              _select(q, k, lse, self.INTERPRET, SMALL, doc_starts=starts,
                      launch=launch),
              selection.block_scores(q, k, lse, SMALL, segment_ids=seg),
              selection.select_blocks(q, k, lse, config=SMALL,
                                      segment_ids=seg))

    got_scores, got, scores, want = kernels_and_xla(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    u.assert_close(got_scores, scores, jnp.float32)
    assert_same_sets_up_to_ties(got, want, scores)


class TestDocumentsInterpret(DocumentsCases):
  INTERPRET = True


@pytest.mark.gpu
class TestDocumentsGpu(DocumentsCases):
  INTERPRET = False


@pytest.mark.lowering
@pytest.mark.parametrize("group", [1, 16])
def test_lowers_to_triton_with_documents(group):
  """Forward and backward of every kernel, documents on, for CUDA."""
  seq_len, tc = 70, CFG.num_compressed(70)
  q, k, v, _ = _qkv(seq_len, 1, group, 24, 16, jnp.bfloat16)
  k_cmp, v_cmp = k[:, :tc], v[:, :tc]
  starts = jnp.zeros((1, seq_len), jnp.int32)
  lse = jnp.zeros(q.shape[:3], jnp.float32)
  idx = jnp.zeros((1, seq_len, 1, CFG.num_selected), jnp.int32)
  grad = lambda f: jax.grad(
      lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))
  kernels = [
      lambda q, k, v, s: pk.compressed_attention(
          q, k, v, block_size=CFG.cmp_block, stride=CFG.cmp_stride,
          interpret=False, doc_starts=s)[0],
      lambda q, k, v, s: pk.selected_attention(
          q, k, v, idx, block_size=CFG.sel_block, interpret=False,
          doc_starts=s),
      lambda q, k, v, s: pk.sliding_window_attention(
          q, k, v, window=20, interpret=False, doc_starts=s),
  ]
  for kernel, (kk, vv) in zip(kernels, [(k_cmp, v_cmp), (k, v), (k, v)]):
    u.lower_for_cuda(kernel, q, kk, vv, starts)
    u.lower_for_cuda(lambda q, k, v, s, f=kernel: grad(
        lambda *a: f(*a, s))(q, k, v), q, kk, vv, starts)
  u.lower_for_cuda(lambda q, k, l, s: _select(q, k, l, False, doc_starts=s),
                   q, k_cmp, lse, starts)
