"""Decoding TransformerLM: every step equals the full-sequence forward."""

import chex
from decode_testing import decode_step
from decode_testing import forward
from decode_testing import make_model
from decode_testing import make_tokens
from decode_testing import poison
from decode_testing import prefill
from decode_testing import TINY
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.decode import CacheOverflowError
from nsa_jax.decode import FullCache
from nsa_jax.decode import NSACache

# 72 tokens: 5 selection blocks (the free top-n slot has candidates from
# t = 48 on), window 32 wraps its ring buffer, a compressed token completes
# every 4 steps from t = 7 on. Prompts end before, on and after block edges.
TOTAL = 72
TOL = dict(atol=2e-5, rtol=2e-5)

VARIANTS = {
    "nsa": dict(attention="nsa"),
    "nsa-shared-kv": dict(attention="nsa", shared_kv=True),
    "nsa-mean-reference": dict(attention="nsa", compression="mean",
                               impl="reference"),
    "nsa-dv12-g4": dict(attention="nsa", v_head_dim=12, num_kv_heads=1),
    "full": dict(attention="full"),
}


def _check_logits_scale(full):
  # A tolerance test is only as strong as the logits are large and varied.
  assert float(jnp.abs(full).mean()) > 0.3
  assert float(jnp.std(full[0, 1:] - full[0, :-1])) > 0.15


@pytest.mark.parametrize("variant,prompt_len", [
    ("nsa", 3), ("nsa", 8), ("nsa", 17), ("full", 3), ("full", 17),
    ("nsa-shared-kv", 8), ("nsa-mean-reference", 17), ("nsa-dv12-g4", 3)])
def test_each_decode_step_equals_full_forward(variant, prompt_len):
  model = make_model(**VARIANTS[variant])
  tokens = make_tokens(1, TOTAL, seed=prompt_len)
  full = forward(model, tokens)
  _check_logits_scale(full)
  cache = model.init_cache(1, TOTAL)
  logits, cache = prefill(model, tokens[:, :prompt_len], cache, None)
  chex.assert_trees_all_close(logits, full[:, :prompt_len], **TOL)
  for t in range(prompt_len, TOTAL):
    step_logits, cache = decode_step(model, tokens[:, t:t + 1], cache)
    np.testing.assert_allclose(step_logits[:, 0], full[:, t], err_msg=f"{t=}",
                               **TOL)
  assert int(cache[0].lengths[0]) == TOTAL


@nnx.jit
def _first_layer_branch_inputs(model, tokens):
  layer = model.layers[0]
  x = layer.attn_norm(model._embed(tokens))  # pylint: disable=protected-access
  return layer.attn.branch_inputs(x)


@pytest.mark.parametrize("variant", ["nsa", "nsa-shared-kv"])
def test_compressed_tokens_made_while_decoding_equal_the_full_ones(variant):
  model = make_model(**VARIANTS[variant])
  tokens = make_tokens(1, 40, seed=3)
  # The cache and prompt of test_each_decode_step_equals_full_forward: the
  # same prefill and step programs, compiled once for both tests.
  cache = model.init_cache(1, TOTAL)
  _, cache = prefill(model, tokens[:, :3], cache, None)  # no compressed yet
  assert not np.asarray(cache[0].k_cmp).any()
  for t in range(3, 40):
    _, cache = decode_step(model, tokens[:, t:t + 1], cache)
  inputs = _first_layer_branch_inputs(model, tokens)
  tc = TINY.num_compressed(40)
  assert tc == 9
  chex.assert_trees_all_close(cache[0].k_cmp[:, :tc], inputs["k_cmp"], **TOL)
  chex.assert_trees_all_close(cache[0].v_cmp[:, :tc], inputs["v_cmp"], **TOL)


@pytest.mark.parametrize("variant", ["nsa", "nsa-shared-kv", "full"])
def test_rows_of_different_lengths_equal_their_full_forward(variant):
  # Each row's prompt and steps equal the full forward of the row alone
  # (causal: its logits at t read tokens <= t only), so a row never sees
  # another's length, padding or cache entries.
  model = make_model(**VARIANTS[variant])
  lengths = [5, 16, 23]
  steps = 30
  max_len = max(lengths) + steps
  seqs = make_tokens(len(lengths), max_len, seed=10)
  full = forward(model, seqs)
  # Right-padded prompts; padding ids are arbitrary and must not matter.
  pad = make_tokens(len(lengths), max(lengths), seed=99)
  prompt = jnp.where(jnp.arange(max(lengths)) < jnp.asarray(lengths)[:, None],
                     seqs[:, :max(lengths)], pad)
  cache = model.init_cache(len(lengths), max_len)
  logits, cache = prefill(model, prompt, cache, jnp.asarray(lengths))
  cache = poison(cache)  # garbage past each row's valid entries
  batched = [[logits[i, n - 1]] for i, n in enumerate(lengths)]
  for s in range(steps):
    nxt = jnp.stack([seqs[i, n + s] for i, n in enumerate(lengths)])
    step_logits, cache = decode_step(model, nxt[:, None], cache)
    for i in range(len(lengths)):
      batched[i].append(step_logits[i, 0])
  for i, n in enumerate(lengths):
    got = np.stack(batched[i])
    assert np.isfinite(got).all(), f"row {i}: garbage reached the output"
    np.testing.assert_allclose(got, full[i, n - 1:n + steps],
                               err_msg=f"row {i}", **TOL)


@pytest.mark.parametrize("variant", ["nsa", "nsa-shared-kv", "full"])
def test_speculative_steps_of_several_tokens_equal_full_forward(variant):
  # Five tokens a step: up to two compressed tokens complete in one step.
  model = make_model(**VARIANTS[variant])
  tokens = make_tokens(2, 62, seed=5)
  full = forward(model, tokens)
  cache = model.init_cache(2, 62, max_query_len=5)
  _, cache = prefill(model, tokens[:, :7], cache, None)
  cache = poison(cache)
  for t in range(7, 62, 5):
    step_logits, cache = decode_step(model, tokens[:, t:t + 5], cache)
    np.testing.assert_allclose(step_logits, full[:, t:t + 5],
                               err_msg=f"{t=}", **TOL)


def test_more_tokens_per_step_than_the_cache_allows_is_an_error():
  model = make_model()
  cache = model.init_cache(1, 32, max_query_len=2)
  _, cache = prefill(model, make_tokens(1, 4), cache, None)
  with pytest.raises(ValueError, match="max_query_len=2"):
    model.decode_step(make_tokens(1, 3), cache)


@pytest.mark.parametrize("variant", ["nsa", "full"])
def test_exceeding_the_cache_is_a_clear_error(variant):
  model = make_model(**VARIANTS[variant])
  cache = model.init_cache(2, 10)
  with pytest.raises(CacheOverflowError, match="prefill.*T=11.*max_length=10"):
    model.prefill(make_tokens(2, 11), cache)
  # Filled by jitted steps (the eager ones run op by op): the cache they
  # return holds concrete lengths, which the eager step below checks.
  _, cache = prefill(model, make_tokens(2, 8), cache, jnp.array([8, 6]))
  for _ in range(2):  # row 0 is full after these
    _, cache = decode_step(model, make_tokens(2, 1), cache)
  with pytest.raises(CacheOverflowError,
                     match="row 0 holds 10 tokens.*max_length=10"):
    model.decode_step(make_tokens(2, 1), cache)


@pytest.mark.parametrize("variant", ["nsa", "full"])
def test_overflow_under_jit_poisons_the_row_and_never_wraps(variant):
  model = make_model(**VARIANTS[variant])
  cache = model.init_cache(2, 16)  # 16 = l': no slack in the allocation
  _, cache = prefill(model, make_tokens(2, 16), cache, jnp.array([16, 9]))
  before = np.asarray(cache[0].k)
  logits, cache = decode_step(model, make_tokens(2, 1), cache)
  assert np.isnan(np.asarray(logits[0])).all()
  assert np.isfinite(np.asarray(logits[1])).all()
  np.testing.assert_array_equal(np.asarray(cache[0].overflowed()),
                                [True, False])
  np.testing.assert_array_equal(np.asarray(cache[0].k)[0], before[0])


def test_prefill_checks_prompt_lengths():
  model = make_model()
  cache = model.init_cache(2, 16)
  with pytest.raises(ValueError, match=r"lengths must lie in \[1, T=6\]"):
    model.prefill(make_tokens(2, 6), cache, jnp.array([0, 6]))
  with pytest.raises(ValueError, match="lengths must be int"):
    model.prefill(make_tokens(2, 6), cache, jnp.array([3.0, 6.0]))


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_cache_is_a_pytree_with_the_documented_shapes(attention):
  model = make_model(attention, shared_kv=False)
  caches = model.init_cache(3, 40, max_query_len=2)
  assert len(caches) == 2
  cache = caches[0]
  if attention == "full":
    assert isinstance(cache, FullCache)
    assert cache.k.shape == (3, 40, 2, 8)
  else:
    assert isinstance(cache, NSACache)
    assert cache.k.shape == (3, 48, 2, 8)  # rounded up to l' = 16
    # w + max_query_len - 1 = 33, rounded up to whole blocks of l' = 16.
    assert cache.k_win.shape == (3, 48, 2, 8)
    assert cache.k_cmp_raw.shape == (3, 9, 2, 8)  # l + max_query_len - 1
    # num_compressed(40) = 9 tokens, rounded up to whole decode steps of 64.
    assert cache.k_cmp.shape == (3, 64, 2, 8)
  leaves = jax.tree.leaves(cache)
  assert all(isinstance(x, jax.Array) for x in leaves)
  moved = jax.jit(lambda c: c)(cache)
  assert moved.max_length == 40


def test_decode_with_the_pallas_kernel_equals_full_forward():
  # impl="pallas": prefill through the training kernels and the selected
  # branch of every step through the decode kernel (interpret mode on CPU).
  model = make_model(impl="pallas")
  tokens = make_tokens(2, 56, seed=8)
  full = forward(model, tokens)
  cache = model.init_cache(2, 56)
  _, cache = prefill(model, tokens[:, :40], cache, None)
  for t in range(40, 56):
    step_logits, cache = decode_step(model, tokens[:, t:t + 1], cache)
    np.testing.assert_allclose(step_logits[:, 0], full[:, t],
                               err_msg=f"{t=}", **TOL)


def test_a_batch_that_does_not_match_the_cache_is_an_error():
  model = make_model()
  cache = model.init_cache(2, 16)
  with pytest.raises(ValueError, match="batch 3, the cache 2 rows"):
    model.prefill(make_tokens(3, 4), cache)


@pytest.mark.parametrize("shared_kv", [False, True])
def test_a_cache_shorter_than_one_compressed_block(shared_kv):
  # max_length 7 < l = 8: no compressed token ever exists (Tc = 0).
  model = make_model(shared_kv=shared_kv)
  tokens = make_tokens(1, 7, seed=6)
  full = forward(model, tokens)
  cache = model.init_cache(1, 7)
  assert cache[0].k_cmp.shape[1] == 0
  _, cache = prefill(model, tokens[:, :2], cache, None)
  for t in range(2, 7):
    step_logits, cache = decode_step(model, tokens[:, t:t + 1], cache)
    np.testing.assert_allclose(step_logits[:, 0], full[:, t],
                               err_msg=f"{t=}", **TOL)
