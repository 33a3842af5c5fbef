"""Branch-2 kernel vs the dense reference: forward, gradients, lowering."""


import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import reference
from pallas_kernels import launch_config
from pallas_kernels import selected_attention
from pallas_kernels.selected_attention import _invert_block_table
from pallas_kernels.selected_attention import tile_unions

import kernel_test_utils as u

BS = 16  # selection block l'


def _inputs(seq_len, num_kv_heads, group, dk, dv, dtype, num_slots, seed=0,
            force_initial=False):
  """Random inputs and a random repeat-free block table with -1 slots.

  With ``force_initial`` (and ``num_slots`` = all blocks) every position
  but 3 and 20 selects block 0, as NSA's forced initial block.
  """
  rng = np.random.default_rng(seed)
  num_blocks = -(-seq_len // BS)
  q = u.normal(rng, (2, seq_len, num_kv_heads * group, dk), dtype)
  k = u.normal(rng, (2, seq_len, num_kv_heads, dk), dtype)
  v = u.normal(rng, (2, seq_len, num_kv_heads, dv), dtype)
  d_out = u.normal(rng, (2, seq_len, num_kv_heads * group, dv), jnp.float32)
  # Any block, future ones included: the kernel must mask s > t itself.
  perm = np.argsort(rng.random((2, seq_len, num_kv_heads, num_blocks)),
                    axis=-1)
  idx = perm[..., :num_slots].astype(np.int32)
  drop = rng.random(idx.shape) < 0.3
  if force_initial:
    drop &= idx != 0
  idx = np.where(drop, -1, idx)
  # Position 3 selects nothing; position 20 only a block wholly in its future.
  idx[:, 3:4] = -1
  idx[:, 20:21] = -1
  idx[:, 20:21, :, 0] = 2
  return q, k, v, jnp.asarray(idx), d_out


# Jitted: called eagerly, the kernels' XLA glue runs op by op, each op
# compiled alone (about 5x slower in interpret mode).
def _loss(fn, d_out):
  return jax.jit(
      lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * d_out))


def _kernel(idx, interpret, **kwargs):
  return jax.jit(lambda q, k, v: selected_attention(  # pylint: disable=g-long-lambda
      q, k, v, idx, block_size=BS, interpret=interpret, **kwargs))


def _mask_case(case, q, idx, d_out, *, offset):
  """(q, idx, d_out, kernel kwargs) of a masking case on 70-token inputs:
  "plain", "documents" (starts 0, 30, 55), "window" (20) or "offset" (the
  queries from ``offset`` on, against all 70 keys)."""
  if case == "offset":
    return (q[:, offset:], idx[:, offset:], d_out[:, offset:],
            dict(q_offset=offset))
  starts = np.repeat([[0, 30, 55]] * 2, [30, 25, 15], axis=1)
  return q, idx, d_out, {
      "plain": {}, "window": dict(window=20),
      "documents": dict(doc_starts=jnp.asarray(starts, jnp.int32))}[case]


def _ref(idx):
  return jax.jit(lambda q, k, v: reference.selected_attention_reference(
      q, k, v, idx, block_size=BS))


class SelectedAttentionCases:
  """The kernel's tests; subclasses say whether it runs interpreted."""

  INTERPRET = True

  @pytest.mark.parametrize(
      "seq_len,num_kv_heads,group,dk,dv,dtype,num_slots,block_q",
      [
          (37, 2, 1, 16, 16, jnp.float32, 3, None),  # G=1: 16 positions/tile
          (50, 1, 2, 24, 16, jnp.float32, 4, None),  # Dk != Dv, padded
          (50, 1, 2, 24, 16, jnp.float32, 4, 16),  # larger position tile
          (37, 2, 4, 16, 32, jnp.bfloat16, 3, None),
          (37, 1, 16, 16, 16, jnp.float32, 2, None),  # G=16: the paper's tile
          (20, 1, 2, 16, 24, jnp.float16, 2, None),  # T < 2 blocks, fp16
          (37, 1, 16, 48, 32, jnp.float32, 2, None),  # tile forward: 32 + 16
      ])
  def test_forward_and_gradients(self, seq_len, num_kv_heads, group, dk, dv,
                                 dtype, num_slots, block_q):
    q, k, v, idx, d_out = _inputs(seq_len, num_kv_heads, group, dk, dv, dtype,
                                  num_slots)
    out, grads = u.output_and_grads(
        _kernel(idx, self.INTERPRET, block_q=block_q), d_out)(q, k, v)
    ref_out, ref_grads = u.output_and_grads(_ref(idx), d_out)(q, k, v)
    assert out.dtype == q.dtype
    u.assert_close(out, ref_out, dtype)
    assert np.all(np.asarray(out[:, 3]) == 0)  # nothing selected
    if seq_len > 20:
      assert np.all(np.asarray(out[:, 20]) == 0)  # only future keys
    u.assert_finite(grads)
    u.assert_close(grads, ref_grads, dtype, "grad")
    assert np.all(np.asarray(grads[0][:, 3]) == 0)

  @pytest.mark.parametrize("dq_from_blocks", [True, False])
  def test_dkv_segments(self, dq_from_blocks):
    """Block 0's list of 48 positions spans segments of 16 (the last empty).

    With ``dq_from_blocks`` the dQ shares of a gather step past its
    segment's end must not overwrite the next segment's entries.
    """
    q, k, v, idx, d_out = _inputs(50, 1, 2, 16, 16, jnp.float32, 4,
                                  force_initial=True)
    assert int(jnp.sum(jnp.any(idx[0, :, 0] == 0, -1))) == 48
    kernel = _kernel(idx, self.INTERPRET, block_q_dkv=8, dkv_segment=16,
                     dq_from_blocks=dq_from_blocks)
    u.assert_close(u.output_and_grads(kernel, d_out)(q, k, v)[1],
                   u.output_and_grads(_ref(idx), d_out)(q, k, v)[1],
                   jnp.float32, "grad")

  @pytest.mark.parametrize(
      "seq_len,group,dk,dv,dtype,dq_from_blocks",
      [
          (37, 16, 16, 16, jnp.float32, True),  # G=16, which defaults to False
          (37, 4, 16, 32, jnp.bfloat16, False),  # G=4, which defaults to True
          (20, 2, 24, 16, jnp.float32, True),  # T < 2 blocks, Dk != Dv
      ])
  def test_both_dq_passes(self, seq_len, group, dk, dv, dtype,
                          dq_from_blocks):
    """dQ from the dK/dV pass and from the dQ kernel, each where the
    default would pick the other."""
    q, k, v, idx, d_out = _inputs(seq_len, 1, group, dk, dv, dtype, 3)
    got = u.output_and_grads(
        _kernel(idx, self.INTERPRET, dq_from_blocks=dq_from_blocks),
        d_out)(q, k, v)
    u.assert_close(got, u.output_and_grads(_ref(idx), d_out)(q, k, v),
                   dtype, "grad")

  @pytest.mark.parametrize(
      "seq_len,num_kv_heads,group,dk,dv,dtype,fwd_from_blocks,dq_from_blocks",
      [
          (37, 2, 1, 16, 16, jnp.float32, False, True),  # G=1: blocks default
          (50, 1, 4, 24, 16, jnp.float32, True, False),  # with the dQ kernel
          (37, 2, 4, 16, 32, jnp.bfloat16, False, True),
          (20, 1, 16, 16, 24, jnp.float32, True, True),  # T < 2 blocks, G=16
          (37, 1, 16, 16, 16, jnp.bfloat16, True, False),  # G=16: tiles default
      ])
  def test_both_forwards(self, seq_len, num_kv_heads, group, dk, dv, dtype,
                         fwd_from_blocks, dq_from_blocks):
    """The block-major and query-tile forwards, each where the default
    would pick the other, with either dQ pass."""
    q, k, v, idx, d_out = _inputs(seq_len, num_kv_heads, group, dk, dv, dtype,
                                  3)
    out, grads = u.output_and_grads(
        _kernel(idx, self.INTERPRET, fwd_from_blocks=fwd_from_blocks,
                dq_from_blocks=dq_from_blocks), d_out)(q, k, v)
    ref_out, ref_grads = u.output_and_grads(_ref(idx), d_out)(q, k, v)
    u.assert_close(out, ref_out, dtype)
    assert np.all(np.asarray(out[:, 3]) == 0)  # nothing selected
    u.assert_finite(grads)
    u.assert_close(grads, ref_grads, dtype, "grad")

  @pytest.mark.parametrize("case", ["documents", "window", "offset"])
  def test_block_major_forward_masks(self, case):
    """Documents, window and query offset: the block-major forward and its
    gradients equal the query-tile kernel's."""
    q, k, v, idx, d_out = _inputs(70, 1, 4, 16, 16, jnp.float32, 3)
    q, idx, d_out, kwargs = _mask_case(case, q, idx, d_out, offset=40)
    run = lambda fwd: u.output_and_grads(  # pylint: disable=g-long-lambda
        _kernel(idx, self.INTERPRET, fwd_from_blocks=fwd, **kwargs),
        d_out)(q, k, v)
    u.assert_close(run(True), run(False), jnp.float32, "grad")

  @pytest.mark.parametrize("case", ["plain", "documents", "window", "offset"])
  def test_block_major_passes_in_chunks(self, monkeypatch, case):
    """A buffer cap of a few rows splits both block-major passes into query
    chunks (the last one shorter, with the padding): output and gradients
    equal the query-tile kernels'."""
    q, k, v, idx, d_out = _inputs(70, 1, 4, 16, 16, jnp.float32, 3)
    q, idx, d_out, kwargs = _mask_case(case, q, idx, d_out, offset=22)
    # 2 x 70 x 4 x 3 slots: forward partials of 16 x 4 + 8 bytes, dQ shares
    # of 16 x 4; a 35 kB cap asks for 4 chunks of each, rounded to 32
    # positions they are 32, 32 and 6 with the padding (offset: 3 of 16).
    monkeypatch.setattr(launch_config, "SELECTED_PARTS_MAX_BYTES", 35_000)
    assert launch_config.selected_chunks(2 * 70 * 4 * 3 * 72) == 4
    assert launch_config.selected_chunks(2 * 70 * 4 * 3 * 64) == 4
    run = lambda blocks: u.output_and_grads(  # pylint: disable=g-long-lambda
        _kernel(idx, self.INTERPRET, fwd_from_blocks=blocks,
                dq_from_blocks=blocks, **kwargs), d_out)(q, k, v)
    grad = jax.grad(_loss(_kernel(idx, self.INTERPRET, **kwargs), d_out),
                    argnums=(0, 1, 2))  # the default picks both, chunked
    launches = re.findall(r"\bname=(nsa_\w+)",
                          str(jax.make_jaxpr(grad)(q, k, v)))
    assert sorted(launches) == (["nsa_selected_attention_dkv"] * 3
                                + ["nsa_selected_attention_fwd_blocks"] * 3)
    u.assert_close(run(True), run(False), jnp.float32, "grad")

  def test_window_mask(self):
    q, k, v, idx, d_out = _inputs(37, 1, 2, 16, 24, jnp.float32, 3)
    window = 9
    kernel = _kernel(idx, self.INTERPRET, window=window)

    def ref(q, k, v):
      t = jnp.arange(37)
      mask = reference.selected_block_mask(idx, 37, BS)
      mask &= (t[None, :] > t[:, None] - window)[None, :, None, :]
      mask = jnp.repeat(mask, 2, axis=2)
      return reference.masked_attention(q, k, v, mask, 16 ** -0.5)[0]

    u.assert_close(u.output_and_grads(kernel, d_out)(q, k, v),
                   u.output_and_grads(ref, d_out)(q, k, v),
                   jnp.float32, "grad")

  @pytest.mark.parametrize("fwd_from_blocks", [False, True])
  def test_garbage_slots_are_empty(self, fwd_from_blocks):
    """Out-of-range and repeated slots change nothing (issue 10, 2 and 3).

    Bit for bit with the query-tile forward. The block-major forward sums
    each query's slots in XLA, whose reduction over 8 padded slots may
    round differently from one over 2 (fused multiply-adds), so there the
    check is the float32 tolerance, far below what one garbage block read
    would change.
    """
    q, k, v, idx, d_out = _inputs(37, 1, 2, 16, 16, jnp.float32, 2)
    garbage = jnp.concatenate(
        [idx, idx[..., :1], jnp.full_like(idx[..., :1], 2**31 - 1),
         jnp.full_like(idx[..., :1], 3), jnp.full_like(idx[..., :1], -7)], -1)
    run = lambda table: u.output_and_grads(  # pylint: disable=g-long-lambda
        _kernel(table, self.INTERPRET, fwd_from_blocks=fwd_from_blocks),
        d_out)(q, k, v)
    if fwd_from_blocks:
      u.assert_close(run(garbage), run(idx), jnp.float32, "grad")
    else:
      u.assert_bitwise_equal(run(garbage), run(idx))

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_deterministic(self, dtype):
    """Two runs give the same output and gradients, bit for bit."""
    q, k, v, idx, d_out = _inputs(50, 1, 4, 16, 16, dtype, 3,
                                  force_initial=True)
    run = u.output_and_grads(
        _kernel(idx, self.INTERPRET, dkv_segment=16, block_q_dkv=4), d_out)
    u.assert_bitwise_equal(run(q, k, v), run(q, k, v))


class TestSelectedAttentionInterpret(SelectedAttentionCases):
  INTERPRET = True


@pytest.mark.gpu
class TestSelectedAttentionGpu(SelectedAttentionCases):
  INTERPRET = False


def test_segment_rule():
  seg = launch_config.selected_segment
  assert seg(50, 64) == launch_config.SELECTED_MIN_SEGMENT
  assert seg(50, 512) == 512  # a whole number of gather steps
  for seq_len in (1000, 4096, 65536, 100_000):
    assert -(-seq_len // seg(seq_len, 64)) <= (
        launch_config.SELECTED_MAX_SEGMENTS)
  assert seg(65536, 64) == 8192
  with pytest.raises(ValueError, match="dkv_segment"):
    q, k, v, idx, _ = _inputs(37, 1, 2, 16, 16, jnp.float32, 3)
    selected_attention(q, k, v, idx, block_size=BS, block_q_dkv=16,
                       dkv_segment=8)


def test_inverted_block_table():
  _, _, _, idx, _ = _inputs(37, 2, 1, 16, 16, jnp.float32, 3)
  num_blocks = 3
  offsets, positions = _invert_block_table(idx, num_blocks, pad=4)
  offsets, positions, idx = map(np.asarray, (offsets, positions, idx))
  for b in range(2):
    for g in range(2):
      for j in range(num_blocks):
        got = positions[b, g, offsets[b, g, j]:offsets[b, g, j + 1]]
        want = np.nonzero((idx[b, :, g] == j).any(-1))[0]
        np.testing.assert_array_equal(got, want)


def test_inverted_block_table_drops_repeats():
  idx = jnp.array([[0, 0], [1, -1], [1, 0]], jnp.int32)[None, :, None]
  offsets, positions = _invert_block_table(idx, 2, pad=0)
  np.testing.assert_array_equal(offsets[0, 0], [0, 2, 4])
  np.testing.assert_array_equal(positions[0, 0, :4], [0, 2, 1, 2])


@pytest.mark.parametrize("packed", [True, False])
def test_inverted_block_table_entries(monkeypatch, packed):
  """Each kept slot (t, i) points at its own entry: positions[e] == t in
  block idx[t, i]'s list; empty and repeated slots get -1."""
  if not packed:  # the two-key sort, for tables past the packed key's range
    monkeypatch.setattr(importlib.import_module(
        "pallas_kernels.selected_attention"), "PACKED_KEY_LIMIT", 0)
  _, _, _, idx, _ = _inputs(37, 2, 1, 16, 16, jnp.float32, 3)
  idx = idx.at[:, 5, :, 1].set(idx[:, 5, :, 0])  # a repeated slot
  offsets, positions, entries = map(
      np.asarray, _invert_block_table(idx, 3, pad=4, entries=True))
  idx = np.asarray(idx)
  assert entries.shape == (2, 2, 37, 3)
  for b in range(2):
    for g in range(2):
      for t in range(37):
        for i in range(3):
          e, blk = entries[b, g, t, i], idx[b, t, g, i]
          if blk < 0 or blk in idx[b, t, g, :i]:
            assert e == -1
          else:
            assert positions[b, g, e] == t
            assert offsets[b, g, blk] <= e < offsets[b, g, blk + 1]


@pytest.mark.parametrize("block_q", [1, 2, 4])
def test_tile_unions_are_each_tiles_distinct_blocks_ascending(block_q):
  rng = np.random.default_rng(0)
  idx = rng.integers(-1, 6, size=(2, 8, 3, 4)).astype(np.int32)
  idx[0, :block_q, 0] = -1  # a tile with nothing selected
  union = np.asarray(tile_unions(jnp.asarray(idx), block_q))
  assert union.shape == (2, 8 // block_q, 3, block_q * 4)
  for b in range(2):
    for i in range(8 // block_q):
      for g in range(3):
        tile = idx[b, i * block_q:(i + 1) * block_q, g]
        want = np.unique(tile[tile >= 0])
        got = union[b, i, g]
        np.testing.assert_array_equal(got[:len(want)], want)
        assert (got[len(want):] == -1).all()


# The default passes differ by group (``selected_block_major``): G = 1 and 4
# lower the block-major forward and the dK/dV kernel with dQ shares, G = 16
# the query-tile forward and dQ kernels.
@pytest.mark.lowering
@pytest.mark.parametrize("entry", launch_config.table_entries("selected"))
@pytest.mark.parametrize("group,dk,dv", [(1, 24, 16), (4, 192, 128),
                                         (16, 64, 64), (16, 192, 128)])
def test_lowers_to_triton(entry, group, dk, dv):
  q, k, v, idx, d_out = _inputs(70, 1, group, dk, dv, jnp.bfloat16, 3)
  launch = launch_config.make_config(entry, group=group, seq_len=70,
                                     block_k_in_rows=True)
  # The smallest segment: dK/dV runs ceil(70 / block_k) >= 2 segments.
  kernel = lambda q, k, v: selected_attention(  # pylint: disable=g-long-lambda
      q, k, v, idx, block_size=BS, interpret=False, block_q=launch.block_q,
      block_q_dkv=launch.block_q_dkv, dkv_segment=launch.block_q_dkv,
      num_warps=launch.num_warps, num_stages=launch.num_stages)
  u.lower_for_cuda(kernel, q, k, v)
  u.lower_for_cuda(jax.grad(_loss(kernel, d_out), argnums=(0, 1, 2)), q, k, v)


def test_launch_configs_are_checked_when_built():
  with pytest.raises(ValueError, match="block_q=24 must be a power of two"):
    launch_config.SelectedLaunchConfig(block_q=24, block_q_dkv=16,
                                       num_warps=4, num_stages=2)
  with pytest.raises(ValueError, match="num_warps=3"):
    launch_config.LaunchConfig(block_q=16, block_k=16, num_warps=3,
                               num_stages=2)
  with pytest.raises(ValueError, match="num_stages=0"):
    launch_config.LaunchConfig(block_q=16, block_k=16, num_warps=4,
                               num_stages=0)
  with pytest.raises(ValueError, match="block_k=8 keys"):
    launch_config.LaunchConfig(block_q=16, block_k=8, num_warps=4,
                               num_stages=2)
  launch = launch_config.SelectedLaunchConfig(block_q=1, block_q_dkv=16,
                                              num_warps=4, num_stages=2)
  launch.check_group(16)
  with pytest.raises(ValueError, match="block_q=1 gives 4 query rows"):
    launch.check_group(4)


def test_resolve_applies_and_checks_overrides():
  launch = launch_config.resolve("selected", group=2, head_dim=64,
                                 seq_len=100, block_q_dkv=32, num_warps=None)
  assert launch.block_q_dkv == 32 and launch.num_warps == 4
  with pytest.raises(ValueError, match=r"\['block_k'\] are not launch"):
    launch_config.resolve("selected", group=2, head_dim=64, seq_len=100,
                          block_k=32)
  with pytest.raises(ValueError, match="block_q_dkv=4 gives 8 query rows"):
    launch_config.resolve("selected", group=2, head_dim=64, seq_len=100,
                          block_q_dkv=4)


def test_block_k_is_a_deprecated_name_of_block_q_dkv():
  q, k, v, idx, _ = _inputs(37, 1, 2, 16, 16, jnp.float32, 2)
  with pytest.warns(DeprecationWarning, match="block_q_dkv"):
    old = selected_attention(q, k, v, idx, block_size=BS, interpret=True,
                             block_k=16)
  np.testing.assert_array_equal(old, selected_attention(
      q, k, v, idx, block_size=BS, interpret=True, block_q_dkv=16))


@pytest.mark.lowering
def test_backward_has_no_xla_while_loop(monkeypatch):
  # An XLA while loop outside the kernels (jnp.searchsorted's default scan
  # did this) makes the GPU runtime read its condition back on the host
  # every iteration: the host waits for the GPU inside each training step.
  q, k, v, idx, d_out = _inputs(70, 1, 4, 32, 32, jnp.bfloat16, 3)
  kernel = lambda q, k, v: selected_attention(  # pylint: disable=g-long-lambda
      q, k, v, idx, block_size=BS, interpret=False)
  text = u.lower_for_cuda(jax.grad(_loss(kernel, d_out), argnums=(0, 1, 2)),
                          q, k, v).as_text()
  assert "xla.gpu.triton" in text
  assert "stablehlo.while" not in text
  # The other way of sorting the table's transpose (two-key sort, for
  # (Ts + 1) * T past the packed key's range).
  monkeypatch.setattr(importlib.import_module(
      "pallas_kernels.selected_attention"), "PACKED_KEY_LIMIT", 0)
  text = u.lower_for_cuda(lambda i: _invert_block_table(i, 8, 4),
                          idx).as_text()
  assert "stablehlo.sort" in text and "stablehlo.while" not in text


@pytest.mark.lowering
def test_block_major_passes_in_chunks_lower_to_triton(monkeypatch):
  """Chunks give the block-major kernels a query offset input: lowered
  too."""
  monkeypatch.setattr(launch_config, "SELECTED_PARTS_MAX_BYTES", 20_000)
  q, k, v, idx, d_out = _inputs(70, 1, 4, 64, 64, jnp.bfloat16, 3)
  kernel = lambda q, k, v: selected_attention(  # pylint: disable=g-long-lambda
      q, k, v, idx, block_size=BS, interpret=False, fwd_from_blocks=True,
      dq_from_blocks=True)
  text = u.lower_for_cuda(
      jax.grad(_loss(kernel, d_out), argnums=(0, 1, 2)), q, k, v).as_text()
  assert text.count("nsa_selected_attention_fwd_blocks") >= 2
  assert text.count("nsa_selected_attention_dkv") >= 2
