"""Tests of the jit-compiled train and eval steps."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nsa_jax import data
from nsa_jax import train


def _batch(batch_size=4, seq_len=32, seed=0):
  it = data.PackedIterator(
      np.random.default_rng(seed).integers(0, 64, 4000), batch_size, seq_len)
  return {k: jnp.asarray(v) for k, v in next(it).items()}


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_train_step_reduces_loss(make_lm, attention):
  model = make_lm(attention)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  batch = _batch()
  losses = [float(train.train_step(model, optimizer, batch)["loss"])
            for _ in range(12)]
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.7 * losses[0], losses


def test_grad_accumulation_matches_full_batch(make_lm):
  batch = _batch()
  params, losses = [], []
  for accum in (1, 2):
    model = make_lm("full")
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    out = train.train_step(model, optimizer, batch, grad_accum=accum)
    losses.append(float(out["loss"]))
    params.append(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
  chex.assert_trees_all_close(params[0], params[1], rtol=1e-4, atol=1e-6)


def test_masked_loss_ignores_unscored_tokens():
  logits = jnp.zeros((1, 3, 4)).at[0, 2, 1].set(100.0)
  targets = jnp.array([[0, 0, 2]])
  loss_sum, count = train.masked_loss_sum(
      logits, targets, jnp.array([[1.0, 1.0, 0.0]]))
  np.testing.assert_allclose(float(loss_sum), 2 * np.log(4), rtol=1e-6)
  assert float(count) == 2.0


def test_evaluate_is_mean_over_tokens(make_lm):
  model = make_lm("full")
  batch = {k: np.asarray(v) for k, v in _batch().items()}
  single = train.evaluate(model, [batch])
  assert np.isclose(single, train.evaluate(model, [batch, batch]))
  assert 0 < single < 10


def test_token_ids_outside_the_vocabulary_are_refused(make_lm):
  model = make_lm("full")
  batch = {k: np.asarray(v) for k, v in _batch().items()}
  batch["inputs"] = batch["inputs"].copy()
  batch["inputs"][1, 5] = 300
  with pytest.raises(ValueError,
                     match=r"'inputs' holds token id 300 at position \(1, 5\)"):
    train.evaluate(model, [batch])


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_split_train_step_matches_nnx_jit(make_lm, grad_accum):
  """Same losses, parameters and optimizer state as ``train_step``, bit
  for bit, and the objects are stale until ``sync``."""
  batches = [_batch(seed=s) for s in range(3)]
  results = []
  for split in (False, True):
    model = make_lm("nsa")
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    step = train.SplitTrainStep(model, optimizer, grad_accum=grad_accum)
    losses = []
    for batch in batches:
      out = (step(batch) if split else
             train.train_step(model, optimizer, batch, grad_accum=grad_accum))
      losses.append(np.asarray(out["loss"]))
    if split:
      with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(jax.tree.leaves(nnx.state(model, nnx.Param))[0])
      step.sync()
      step.sync()  # idempotent
    results.append((losses, nnx.to_pure_dict(nnx.state(model)),
                    nnx.to_pure_dict(nnx.state(optimizer))))
  chex.assert_trees_all_equal(results[0], results[1])


def test_split_train_step_continues_after_sync(make_lm):
  model = make_lm("full")
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  step = train.SplitTrainStep(model, optimizer)
  batch = _batch()
  first = float(step(batch)["loss"])
  step.sync()
  assert train.evaluate(model, [batch]) < first  # the synced model is updated
  losses = [float(step(batch)["loss"]) for _ in range(5)]
  assert losses[-1] < first


def test_split_train_step_leaves_frozen_arrays_alone(make_lm):
  """Only what the optimizer updates is donated: a frozen weight shared
  with another object stays readable, and unchanged, after steps."""
  model = make_lm("full")
  optimizer = nnx.Optimizer(
      model, optax.adam(1e-2),
      wrt=nnx.All(nnx.Param, nnx.PathContains("mlp")))
  frozen = model.embed.embedding[...]  # e.g. a dense model sharing it
  before = np.asarray(frozen)
  trained = np.asarray(model.layers[0].mlp.down.kernel[...])
  step = train.SplitTrainStep(model, optimizer)
  for seed in range(2):
    step(_batch(seed=seed))
  np.testing.assert_array_equal(np.asarray(frozen), before)
  step.sync()
  np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]),
                                before)
  assert not np.array_equal(
      np.asarray(model.layers[0].mlp.down.kernel[...]), trained)
