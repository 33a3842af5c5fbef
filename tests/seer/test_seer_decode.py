"""Gated decoding: the K-compression cache, dense equality, sparse forward.

The block-sparse decode kernel behind it is tested in tests/decode (interpret)
and, for SeerAttention-R's tables, in tests/gpu/test_seer_gpu.py.
"""

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest
from seer_testing import make_lm
from seer_testing import tokens as make_tokens

from nsa_jax.decode import layers as layers_lib
from nsa_jax.seer import decode as decode_lib
from nsa_jax.seer.config import Selection
from nsa_jax.seer.model import SeerLM

_step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
_prefill = nnx.jit(lambda m, t, c, n: m.prefill(t, c, n))
_forward = nnx.jit(lambda m, t: m(t))
_keys = nnx.jit(lambda gate, k: gate.keys(k))
# One model and gates for every test of the file.
LM = make_lm(Selection(budget=48))


def test_decode_steps_equal_the_sparse_forward_and_pool_every_block():
  """Rows prefilled to different lengths, then decoded: each step reads
  what SeerLM.__call__ reads at its position (3 blocks of 16: block 0, the
  own block, one by the gate), and after every step the first layer's cache
  holds the gate keys of the whole sequence's complete blocks and the open
  block's raw keys in their ring slots."""
  lm = LM
  b, t, size = 2, 60, 16
  toks = make_tokens(b, t, seed=2)
  full = np.asarray(_forward(lm, toks))
  assert not np.allclose(full, _forward(lm.model, toks), atol=1e-3)
  layer, gate = lm.model.layers[0].attn, lm.gates.layers[0]
  x = lm.model.layers[0].attn_norm(lm.model.embed(toks))
  k_raw = np.asarray(layers_lib.full_qkv(layer, x)[1])  # before RoPE
  want_gate = np.asarray(_keys(gate, jnp.asarray(k_raw)))
  lengths = np.array([40, 27])
  caches = lm.init_cache(b, t)
  _, caches = _prefill(lm, toks[:, :40], caches, jnp.asarray(lengths))
  rows = np.arange(b)

  def check_cache(cache):
    for row, n in zip(rows, lengths):
      done = n // size
      np.testing.assert_allclose(np.asarray(cache.k_gate)[row, :done],
                                 want_gate[row, :done], rtol=1e-5, atol=1e-5,
                                 err_msg=f"row {row} at length {n}")
      slots = np.arange(done * size, n)
      np.testing.assert_allclose(np.asarray(cache.k_open)[row, slots % size],
                                 k_raw[row, slots], rtol=1e-5, atol=1e-6)

  check_cache(caches[0])
  for _ in range(t - 40):
    got, caches = _step(lm, toks[rows, lengths][:, None], caches)
    np.testing.assert_allclose(got[:, 0], full[rows, lengths], rtol=1e-5,
                               atol=1e-5, err_msg=f"positions {lengths}")
    lengths = lengths + 1
    check_cache(caches[0])


def test_budget_over_every_block_decodes_as_dense():
  """budget >= the blocks of the cache: every causal block, dense decode
  (both decode from an empty cache, token by token)."""
  lm = LM.with_selection(Selection(budget=10_000))
  toks = make_tokens(2, 50, seed=1)
  caches, dense = lm.init_cache(2, 50), lm.model.init_cache(2, 50)
  for i in range(50):
    got, caches = _step(lm, toks[:, i:i + 1], caches)
    want, dense = _step(lm.model, toks[:, i:i + 1], dense)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                               err_msg=f"position {i}")


def test_bad_input_raises_clear_errors():
  lm = LM
  caches = lm.init_cache(2, 40)
  with pytest.raises(ValueError, match="one token a step"):
    lm.decode_step(make_tokens(2, 2), caches)
  with pytest.raises(ValueError, match="one token a step"):
    lm.init_cache(2, 40, max_query_len=2)
  with pytest.raises(ValueError, match="no selection"):
    SeerLM(lm.model, lm.gates).decode_step(make_tokens(2, 1), caches)
  with pytest.raises(ValueError, match="at least 2"):
    lm.with_selection(Selection(budget=20))
  with pytest.raises(ValueError, match="blocks of"):
    decode_lib.decode_step(
        lm.model.layers[0].attn, lm.gates.layers[0], jnp.zeros((2, 1, 32)),
        decode_lib.SeerCache.create(2, 40, 2, 16, 32, 8), lm.selection)
  with pytest.raises(ValueError, match="overflow"):
    full = tuple(c.replace(lengths=c.lengths + 40) for c in caches)
    lm.decode_step(make_tokens(2, 1), full)
