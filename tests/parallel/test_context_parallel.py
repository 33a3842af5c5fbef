"""Sharded NSA equals single-device NSA, forward and gradients.

Each case compiles the sharded forward + backward once, runs it against
``ops.nsa_attention`` and reads the compiled program's collectives, which
must be exactly the bytes ``comm.predict`` computes from the shapes.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig
from nsa_jax import ops
from nsa_jax import parallel
from nsa_jax.parallel import comm

from nsa_cases import normal

# T = 64, l' = 16, w - 1 = 11: T / P = 32 and 16 put block edges on shard
# edges, 8 does not (a block spans two shards, the window three). With
# n = 3 of Ts = 4 blocks the last block's queries rank blocks 1 and 2.
CFG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, num_selected=3,
                num_initial=1, num_local=1, window=12)
B, HQ, HKV, D = 2, 4, 2, 16
ARGS = ("q", "k", "v", "gates", "k_cmp", "v_cmp", "k_win", "v_win")


@functools.cache
def _inputs(seq_len):
  rng = np.random.default_rng(seq_len)
  num_cmp = CFG.num_compressed(seq_len)
  shapes = [(B, seq_len, HQ, D), (B, seq_len, HKV, D), (B, seq_len, HKV, D),
            (B, seq_len, HQ, 3), (B, num_cmp, HKV, D), (B, num_cmp, HKV, D),
            (B, seq_len, HKV, D), (B, seq_len, HKV, D)]
  arrays = [normal(rng, shape) for shape in shapes]
  arrays[3] = jax.nn.sigmoid(arrays[3])
  cotangent = normal(rng, (B, seq_len, HQ, D))
  return tuple(arrays), cotangent


def _value_and_grad(attention, cotangent):
  """(out, grads wrt all eight inputs) of sum(out * cotangent)."""
  def loss(*arrays):
    out = attention(*arrays)
    return jnp.sum(out * cotangent), out
  grad = jax.value_and_grad(loss, argnums=tuple(range(len(ARGS))),
                            has_aux=True)
  return lambda *arrays: (lambda r: (r[0][1], r[1]))(grad(*arrays))


def _nsa(fn, **kwargs):
  return lambda q, k, v, g, kc, vc, kw, vw: fn(
      q, k, v, g, CFG, k_cmp=kc, v_cmp=vc, k_win=kw, v_win=vw, **kwargs)


@functools.cache
def _reference(seq_len):
  arrays, cotangent = _inputs(seq_len)
  return jax.jit(_value_and_grad(_nsa(ops.nsa_attention, impl="xla"),
                                 cotangent))(*arrays)


CASES = [
    # P, T, strategy, capacity, impl
    pytest.param(4, 64, "allgather", 4, "xla", id="P4-edges-on-shards"),
    pytest.param(8, 64, "allgather", 4, "xla", id="P8-edges-off-two-hop"),
    # Capacity 2 holds every block of a shard: the all-to-all path. With 1,
    # the queries of block 2 (shard 1) have only blocks 0, 1, 2 to choose
    # from, so they ask shard 0 for two blocks: the all-gather fallback.
    pytest.param(2, 64, "gather", 2, "xla", id="P2-gather"),
    pytest.param(2, 64, "gather", 1, "xla", id="P2-gather-falls-back"),
    pytest.param(2, 64, "heads", 4, "xla", id="P2-heads"),
    # The Pallas kernels per shard (interpreted here): branch 1 and 2 with
    # the shard's traced offset, 2 against all keys, or against the gather
    # frame [received blocks | own keys] at offset P * C * l'; the window on
    # the halo frame.
    pytest.param(4, 64, "allgather", 4, "pallas", id="P4-pallas"),
    pytest.param(2, 64, "gather", 2, "pallas", id="P2-gather-pallas"),
]
# The kernels a sequence shard runs with impl="pallas" (pallas_call names).
KERNELS = ("nsa_compressed_attention_fwd", "nsa_compressed_attention_dkv",
           "nsa_selected_attention_fwd", "nsa_selected_attention_dkv")


@pytest.mark.parametrize("num_shards, seq_len, strategy, capacity, impl",
                         CASES)
def test_sharded_nsa_equals_single_device(num_shards, seq_len, strategy,
                                          capacity, impl):
  mesh = parallel.MeshConfig(sequence=num_shards).make(
      jax.devices()[:num_shards])
  context = parallel.ContextParallel(strategy=strategy, capacity=capacity)
  arrays, cotangent = _inputs(seq_len)
  sharded = _value_and_grad(
      _nsa(parallel.sharded_nsa_attention, impl=impl, mesh=mesh,
           context=context), cotangent)
  if impl == "pallas":
    program = str(jax.make_jaxpr(sharded)(*arrays))
    assert all(name in program for name in KERNELS)
  compiled = jax.jit(sharded).lower(*arrays).compile()
  out, grads = compiled(*arrays)
  want_out, want_grads = _reference(seq_len)
  chex.assert_trees_all_close(out, want_out, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(dict(zip(ARGS, grads)),
                              dict(zip(ARGS, want_grads)),
                              atol=5e-5, rtol=5e-5)
  shape = comm.LayerShape(B, seq_len, HQ, HKV, D, D, 4, CFG)
  predicted = comm.total_by_kind(comm.predict(
      shape, comm.Split(num_shards), context, backward=True))
  assert comm.received_by_kind(
      comm.hlo_collectives(compiled.as_text())) == predicted


def test_no_active_mesh_is_the_single_device_op():
  arrays, _ = _inputs(64)
  got = _nsa(parallel.nsa_attention, impl="xla")(*arrays)
  want = _nsa(ops.nsa_attention, impl="xla")(*arrays)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("num_shards, seq_len, strategy, message", [
    (4, 66, "allgather", "sequence = 66 does not split into 4"),
    (4, 96, "gather", "multiple of sel_block = 16"),
    (4, 64, "heads", "2 kv heads .* over 4 sequence shards"),
])
def test_bad_splits_are_named(num_shards, seq_len, strategy, message):
  mesh = parallel.MeshConfig(sequence=num_shards).make(
      jax.devices()[:num_shards])
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype)
            for x in _inputs(64)[0]]
  shapes = [jax.ShapeDtypeStruct(
      (s.shape[0], seq_len if s.shape[1] == 64 else
       CFG.num_compressed(seq_len), *s.shape[2:]), s.dtype) for s in shapes]
  fn = _nsa(parallel.sharded_nsa_attention, impl="xla", mesh=mesh,
            context=parallel.ContextParallel(strategy=strategy))
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(fn, *shapes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="ring"), "strategy='ring' is not one of"),
    (dict(capacity=0), "capacity=0 must be a positive int"),
])
def test_bad_strategy_is_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    parallel.ContextParallel(**kwargs)
