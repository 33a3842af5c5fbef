"""Tests of orbax checkpoints: round trip, partial and incompatible ones."""

import gc

import chex
from flax import nnx
import jax
import numpy as np
import optax
import pytest

from nsa_jax import data
from nsa_jax import train
from nsa_jax.train import checkpoint


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


# Shapes are checked on the metadata, before orbax starts reading arrays: no
# reader is cut off, so nothing is reported when the garbage is collected.
@pytest.mark.filterwarnings(
    "error:(?s).*coroutine object _read_array"
    ":pytest.PytestUnraisableExceptionWarning")
def test_other_shapes_are_refused_quietly(tmp_path):
  _save(tmp_path)
  with train.Checkpointer(tmp_path, config={"w": 4}) as ckpt, pytest.raises(
      train.CheckpointError, match="does not fit") as info:
    ckpt.restore(*_toy(width=5))
  assert "saved float32[3, 4], expected float32[3, 5]" in str(info.value)
  assert not isinstance(info.value, checkpoint.CorruptCheckpointError)
  gc.collect()


def _damage(directory, step, how):
  """Truncates or deletes the array data files of checkpoint ``step``."""
  files = [p for p in (directory / str(step) / "state").rglob("*")
           if p.is_file() and p.parent.name == "d"]
  assert files
  for path in files:
    if how == "truncate":
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:
      path.unlink()


def _save_steps(directory, steps):
  """Checkpoints of one run at ``steps``; the model at step s has seed s."""
  models = {}
  with train.Checkpointer(directory, config={"w": 4}, keep=5) as ckpt:
    for step in steps:
      model, optimizer = _toy(seed=step)
      ckpt.save(step, model, optimizer, jax.random.key(step), {"step": step})
      models[step] = model
  return models


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_corrupt_latest_falls_back_to_newest_good_one(tmp_path, how):
  models = _save_steps(tmp_path, [2, 4, 6])
  _damage(tmp_path, 6, how)
  notes = []
  model, optimizer = _toy(seed=99)
  with train.Checkpointer(tmp_path, config={"w": 4}) as ckpt:
    restored = ckpt.restore(model, optimizer, log=notes.append)
  assert restored.step == 4 and restored.data_state == {"step": 4}
  chex.assert_trees_all_equal(_pure(model), _pure(models[4]))
  assert len(notes) == 1 and "is corrupt" in notes[0]
  assert str(tmp_path / "6") in notes[0]
  assert "falling back to step 4" in notes[0]


def test_a_chosen_corrupt_step_is_refused_and_a_good_one_restores(tmp_path):
  models = _save_steps(tmp_path, [2, 4])
  _damage(tmp_path, 4, "truncate")
  with train.Checkpointer(tmp_path, config={"w": 4}) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpointError, match="corrupt"):
      ckpt.restore(*_toy(), step=4)
    model, optimizer = _toy(seed=99)
    assert ckpt.restore(model, optimizer, step=2).step == 2
  chex.assert_trees_all_equal(_pure(model), _pure(models[2]))


def test_all_corrupt_gives_clear_error(tmp_path):
  _save_steps(tmp_path, [2, 4])
  _damage(tmp_path, 2, "delete")
  _damage(tmp_path, 4, "truncate")
  with train.Checkpointer(tmp_path, config={"w": 4}) as ckpt, pytest.raises(
      train.CheckpointError, match=r"every checkpoint .* is corrupt"):
    ckpt.restore(*_toy(), log=lambda _: None)


def test_a_refused_restore_creates_nothing(tmp_path):
  missing = tmp_path / "run" / "checkpoints"
  with train.Checkpointer(missing) as ckpt, pytest.raises(
      train.CheckpointError, match="does not exist"):
    ckpt.restore(*_toy())
  assert not (tmp_path / "run").exists()


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
