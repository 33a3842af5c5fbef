"""Tests of orbax checkpoints: round trip, partial and incompatible ones."""

import gc
import os

import chex
from flax import nnx
import jax
import numpy as np
import optax
import pytest

from nsa_jax import data
from nsa_jax import train


class _Toy(nnx.Module):

  def __init__(self, width=4, seed=0):
    self.linear = nnx.Linear(3, width, rngs=nnx.Rngs(seed))


def _toy(width=4, seed=0):
  model = _Toy(width, seed)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  return model, optimizer


def _pure(node):
  return nnx.to_pure_dict(nnx.state(node))


def _save(directory, step=2, config=None, seed=0):
  model, optimizer = _toy(seed=seed)
  grads = jax.tree.map(jax.numpy.ones_like, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  ckpt = train.Checkpointer(directory, config=config or {"w": 4})
  ckpt.save(step, model, optimizer, jax.random.key(7), {"step": 5},
            extra={"train_s": 1.5})
  ckpt.wait()
  ckpt.close()
  return model, optimizer


def test_round_trip_restores_identical_state(tmp_path):
  model, optimizer = _save(tmp_path, seed=0)
  other, other_opt = _toy(seed=1)
  with train.Checkpointer(tmp_path, config={"w": 4}) as ckpt:
    restored = ckpt.restore(other, other_opt)
  chex.assert_trees_all_equal(_pure(other), _pure(model))
  chex.assert_trees_all_equal(_pure(other_opt), _pure(optimizer))
  assert restored.step == 2 and restored.data_state == {"step": 5}
  assert restored.extra == {"train_s": 1.5}
  np.testing.assert_array_equal(jax.random.key_data(restored.rng),
                                jax.random.key_data(jax.random.key(7)))


def test_partial_checkpoint_is_never_restored(tmp_path):
  _save(tmp_path, step=2)
  (tmp_path / "5" / "state").mkdir(parents=True)  # a copy cut short
  (tmp_path / "6.orbax-checkpoint-tmp-123").mkdir()  # orbax mid-write
  with train.Checkpointer(tmp_path, config={"w": 4}) as ckpt:
    assert ckpt.complete_steps() == [2]
    assert not (tmp_path / "5").exists()
    assert (tmp_path / "_partial" / "5" / "state").is_dir()
    assert ckpt.restore(*_toy()).step == 2
    model, optimizer = _toy()
    ckpt.save(4, model, optimizer, jax.random.key(0), {})  # not blocked by 5
    ckpt.wait()
    assert ckpt.complete_steps() == [2, 4]


def test_only_partial_checkpoints_give_clear_error(tmp_path):
  (tmp_path / "3").mkdir()
  (tmp_path / "3" / "_CHECKPOINT_METADATA").write_text("{}")
  with train.Checkpointer(tmp_path) as ckpt, pytest.raises(
      train.CheckpointError, match="no complete checkpoint") as info:
    ckpt.restore(*_toy())
  assert str(tmp_path) in str(info.value) and "'3'" in str(info.value)


def test_missing_directory_gives_clear_error(tmp_path):
  missing = tmp_path / "nowhere"
  with train.Checkpointer(missing) as ckpt:
    os.rmdir(missing)  # orbax creates it; a resume into a fresh path
    with pytest.raises(train.CheckpointError, match="does not exist") as info:
      ckpt.restore(*_toy())
  assert str(missing) in str(info.value)


def test_other_config_is_refused(tmp_path):
  _save(tmp_path, config={"w": 4, "attention": "nsa"})
  with train.Checkpointer(tmp_path, config={"w": 4, "attention": "full"}
                         ) as ckpt, pytest.raises(
                             train.CheckpointError, match="attention") as info:
    ckpt.restore(*_toy())
  assert str(tmp_path) in str(info.value)


# Orbax leaves a read coroutine behind when shapes disagree; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_other_shapes_are_refused(tmp_path):
  _save(tmp_path)
  with train.Checkpointer(tmp_path, config={"w": 4}) as ckpt, pytest.raises(
      train.CheckpointError, match="does not fit"):
    ckpt.restore(*_toy(width=5))
  gc.collect()  # the leftover coroutine is reported here, where it is ignored


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path, make_lm):
  cfg = train.TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=0,
                          log_every=1, eval_every=0, progress=False)
  stream = np.arange(500) % 256
  it = data.PackedIterator(stream, 2, 16)
  train.train(make_lm(), cfg, it, tmp_path, log=lambda _: None)
  assert (tmp_path / "checkpoints" / "2").is_dir()
  with pytest.raises(train.CheckpointError, match="already holds"):
    train.train(make_lm(), cfg, data.PackedIterator(stream, 2, 16), tmp_path,
                log=lambda _: None)
