"""The HLO collective reader and the request bookkeeping of 'gather'."""

import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.parallel import comm
from nsa_jax.parallel import selected

_LINES = {
    "all-gather": (
        "%ag = f32[2,64,2,16]{3,2,0,1} all-gather(%x), channel_id=1, "
        "replica_groups={{0,1,2,3}}, dimensions={1}, metadata={op_name="
        "\"jit(f)/shard_map/all_gather\"}", 16384 * 3 // 4),
    "all-to-all": (
        "%a2a = (bf16[1,2,8]{2,1,0}, /*index=1*/bf16[1,2,8]{2,1,0}) "
        "all-to-all(%a, %b), "
        "replica_groups=[2,2]<=[4], metadata={op_name=\"shard_map/x\"}",
        64 // 2),
    "collective-permute": (
        "%cp = f32[2,11,2,16]{3,2,1,0} collective-permute(%s), "
        "source_target_pairs={{0,1},{1,2}}, metadata={op_name=\"shard_map\"}",
        2816),
    "reduce-scatter": (
        "%rs = f32[4,8]{1,0} reduce-scatter(%g), replica_groups=mesh["
        "'axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, metadata={"
        "op_name=\"transpose(shard_map)\"}", 128 * 3),
    "all-reduce": (
        "%ar = s32[] all-reduce(%c), replica_groups={{0},{1}}, "
        "to_apply=%max, metadata={op_name=\"shard_map/pmax\"}", 0),
}


@pytest.mark.parametrize("kind", list(_LINES))
def test_each_collective_is_read_with_its_group(kind):
  line, received = _LINES[kind]
  (found,) = comm.hlo_collectives(line)
  assert (found.kind, found.received, found.from_shard_map) == (
      kind, received, True)


def test_async_start_counts_once_and_compiler_inserted_is_apart():
  hlo = "\n".join([
      "%s = (f32[4]{0}, f32[16]{0}) all-gather-start(%x), "
      "replica_groups={{0,1,2,3}}, dimensions={0}",
      "%d = f32[16]{0} all-gather-done(%s)",
  ])
  (found,) = comm.hlo_collectives(hlo)
  assert (found.kind, found.received, found.from_shard_map) == (
      "all-gather", 48, False)
  assert comm.received_by_kind([found]) == {}
  assert comm.received_by_kind([found], shard_map_only=False) == {
      "all-gather": 48}


def test_requests_and_their_ranks_per_source_shard():
  # Shard 2 of 3 (blocks 4, 5 are its own; 2 per shard), one row, 2 heads.
  table = jnp.array([[[[0, 5], [1, -1]],
                      [[3, 2], [1, 4]]]], jnp.int32)  # [B=1, Tl=2, Hkv=2, 2]
  need = selected._requests(table, first_local=4, num_blocks=6)
  np.testing.assert_array_equal(need, [[[1, 0, 1, 1, 0, 0],
                                        [0, 1, 0, 0, 0, 0]]])
  rank, count = selected._ranks(need, 2)
  np.testing.assert_array_equal(count, [[[1, 2, 0], [1, 0, 0]]])
  np.testing.assert_array_equal(rank[0, 0, :4], [0, 0, 0, 1])
