"""Orbax checkpoints of a training run that survive a crash.

A checkpoint ``<directory>/<step>/`` holds two items: ``state`` (model and
optimizer pytrees and the run's JAX key) and ``meta`` (JSON: step, the data
iterator's position, the run's config and any extra numbers). Orbax
writes each step into a temporary directory and renames it when complete;
only directories that also carry orbax's commit markers count as complete.
Anything else that looks like a step (a copy cut short, a crash on a file
system without atomic renames) is reported and moved to
``<directory>/_partial/`` so it can never be restored or block later saves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from typing import Any

from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp

_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")
_ITEMS = ("state", "meta")
PARTIAL_DIR = "_partial"


class CheckpointError(RuntimeError):
  """A checkpoint directory is missing, partial or does not fit the run."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What a restore hands back besides the updated model and optimizer.

  Attributes:
    step: the optimizer steps done when the checkpoint was saved.
    rng: the run's JAX key at that step.
    data_state: the training data iterator's ``state()``.
    extra: free-form JSON saved with the checkpoint (e.g. elapsed time).
  """

  step: int
  rng: jax.Array
  data_state: dict[str, Any]
  extra: dict[str, Any]


def _is_step_name(name: str) -> bool:
  return name.isdigit()


def _missing_parts(path: pathlib.Path) -> list[str]:
  """Markers and items that a complete step directory has and ``path`` lacks."""
  return [n for n in (*_MARKERS, *_ITEMS) if not (path / n).exists()]


def scan(directory: str | pathlib.Path) -> tuple[list[int], list[int]]:
  """Complete and partial step numbers under ``directory`` (sorted)."""
  root = pathlib.Path(directory)
  if not root.is_dir():
    return [], []
  complete, partial = [], []
  for child in root.iterdir():
    if child.is_dir() and _is_step_name(child.name):
      (partial if _missing_parts(child) else complete).append(int(child.name))
  return sorted(complete), sorted(partial)


def _quarantine(root: pathlib.Path, steps: list[int]) -> None:
  for step in steps:
    src = root / str(step)
    logging.warning(
        "checkpoint %s is partial (missing %s); moving it to %s", src,
        ", ".join(_missing_parts(src)), root / PARTIAL_DIR)
    dst = root / PARTIAL_DIR / str(step)
    suffix = 0
    while dst.exists():
      suffix += 1
      dst = root / PARTIAL_DIR / f"{step}.{suffix}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dst))


def _savable(tree):
  """Typed PRNG keys to their uint32 data, which orbax can write."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x)
      if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
      else x, tree)


def _unsavable(saved, target):
  """Inverse of ``_savable``, taking key implementations from ``target``."""
  return jax.tree.map(
      lambda s, t: jax.random.wrap_key_data(s, impl=jax.random.key_impl(t))
      if jax.dtypes.issubdtype(getattr(t, "dtype", None), jax.dtypes.prng_key)
      else s, saved, target)


def _diff(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
  keys = sorted(set(saved) | set(current))
  return {k: (saved.get(k), current.get(k)) for k in keys
          if saved.get(k) != current.get(k)}


class Checkpointer:
  """Saves and restores model, optimizer, RNG and data position with orbax.

  Args:
    directory: where step directories live (created on first save).
    config: JSON-able dict describing the run (model and data settings); a
      checkpoint saved under another config is refused on restore.
    keep: newest checkpoints kept.
    async_save: let orbax write in a background thread.
  """

  def __init__(self, directory: str | pathlib.Path, *,
               config: dict[str, Any] | None = None, keep: int = 3,
               async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self.config = json.loads(json.dumps(config or {}))
    _, partial = scan(self.directory)
    _quarantine(self.directory, partial)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save),
    )

  def complete_steps(self) -> list[int]:
    """Steps with a complete checkpoint, oldest first."""
    return scan(self.directory)[0]

  def latest_step(self) -> int | None:
    steps = self.complete_steps()
    return steps[-1] if steps else None

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer,
           rng: jax.Array, data_state: dict[str, Any],
           extra: dict[str, Any] | None = None) -> None:
    """Starts writing checkpoint ``step`` (returns before it is done if async).
    """
    state = _savable({"model": nnx.to_pure_dict(nnx.state(model)),
                      "optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
                      "rng": rng})
    meta = {"step": int(step), "data_state": data_state,
            "config": self.config, "extra": extra or {}}
    self._manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta)),
        force=True)

  def restore(self, model: nnx.Module, optimizer: nnx.Optimizer,
              step: int | None = None,
              rng_like: jax.Array | None = None) -> Restored:
    """Loads a checkpoint into ``model`` and ``optimizer`` in place.

    Args:
      model: the run's model, its shapes define what is expected.
      optimizer: its optimizer.
      step: which step, default the latest complete one.
      rng_like: a key of the saved key's implementation (default
        ``jax.random.key(0)``).

    Returns:
      The step, RNG key, data position and extra numbers saved with it.

    Raises:
      CheckpointError: no complete checkpoint, or one that does not fit the
        model, optimizer or config; the message names the directory.
    """
    self.wait()
    complete, _ = scan(self.directory)
    if not complete:
      partial = sorted(p.name for p in (self.directory / PARTIAL_DIR).glob("*")
                       ) if (self.directory / PARTIAL_DIR).is_dir() else []
      what = ("does not exist" if not self.directory.is_dir()
              else "holds no complete checkpoint")
      raise CheckpointError(
          f"cannot resume: checkpoint directory {self.directory} {what}"
          + (f" (partial checkpoints set aside: {partial})" if partial else ""))
    step = complete[-1] if step is None else step
    if step not in complete:
      raise CheckpointError(
          f"no complete checkpoint for step {step} in {self.directory}; "
          f"complete steps: {complete}")
    path = self.directory / str(step)
    try:
      meta = self._manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types
      raise CheckpointError(f"cannot read metadata of {path}: {e}") from e
    diff = _diff(meta.get("config", {}), self.config)
    if diff:
      raise CheckpointError(
          f"checkpoint {path} was saved by a run with another config; "
          f"differing fields (saved, current): {diff}")
    target = {"model": nnx.to_pure_dict(nnx.state(model)),
              "optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
              "rng": jax.random.key(0) if rng_like is None else rng_like}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _savable(target))
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # orbax raises many types
      raise CheckpointError(
          f"checkpoint {path} does not fit this model/optimizer: {e}") from e
    state = restored["state"]
    _check_shapes(path, state, abstract)
    state = _unsavable(state, target)
    _update(model, state["model"])
    _update(optimizer, state["optimizer"])
    return Restored(step=int(meta["step"]), rng=state["rng"],
                    data_state=meta["data_state"], extra=meta.get("extra", {}))

  def wait(self) -> None:
    """Blocks until background writes are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and stops orbax's background workers."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _check_shapes(path, restored, abstract) -> None:
  bad = []

  def check(keypath, r, a):
    if tuple(np.shape(r)) != tuple(a.shape) or np.asarray(r).dtype != a.dtype:
      bad.append(f"{jax.tree_util.keystr(keypath)}: saved "
                 f"{np.asarray(r).dtype}{list(np.shape(r))}, expected "
                 f"{a.dtype}{list(a.shape)}")

  jax.tree_util.tree_map_with_path(check, restored, abstract)
  if bad:
    raise CheckpointError(
        f"checkpoint {path} does not fit this model/optimizer: "
        + "; ".join(bad[:5]))


def _update(node, pure: dict[str, Any]) -> None:
  state = nnx.state(node)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(node, state)
