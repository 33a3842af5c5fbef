"""Orbax checkpoints of a training run that survive a crash.

A checkpoint ``<directory>/<step>/`` holds two items: ``state`` (model and
optimizer pytrees and the run's JAX key) and ``meta`` (JSON: step, the data
iterator's position, the run's config and any extra numbers). Orbax
writes each step into a temporary directory and renames it when complete;
only directories that also carry orbax's commit markers count as complete.
Anything else that looks like a step (a copy cut short, a crash on a file
system without atomic renames) is reported and moved to
``<directory>/_partial/`` so it can never be restored or block later saves.
A complete checkpoint whose files do not read back (a data file truncated or
deleted later) is corrupt: a restore without an explicit step reports it and
falls back to the newest older one that reads.
"""

from __future__ import annotations

from collections.abc import Callable
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
SET_ASIDE_DIR = "_set_aside"


class CheckpointError(RuntimeError):
  """A checkpoint directory is missing, partial or does not fit the run."""


class CorruptCheckpointError(CheckpointError):
  """A complete checkpoint whose files do not read back (truncated, lost)."""


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


def _move_aside(root: pathlib.Path, step: int, folder: str) -> pathlib.Path:
  """Moves step directory ``step`` into ``root/folder/`` (never overwrites)."""
  dst = root / folder / str(step)
  suffix = 0
  while dst.exists():
    suffix += 1
    dst = root / folder / f"{step}.{suffix}"
  dst.parent.mkdir(parents=True, exist_ok=True)
  shutil.move(str(root / str(step)), str(dst))
  return dst


def _quarantine(root: pathlib.Path, steps: list[int]) -> None:
  for step in steps:
    src = root / str(step)
    logging.warning(
        "checkpoint %s is partial (missing %s); moving it to %s", src,
        ", ".join(_missing_parts(src)), root / PARTIAL_DIR)
    _move_aside(root, step, PARTIAL_DIR)


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
    self._keep, self._async = keep, async_save
    _, partial = scan(self.directory)
    _quarantine(self.directory, partial)
    # Made on first save or restore, so that a refused run creates nothing.
    self._manager = None

  def _orbax(self) -> ocp.CheckpointManager:
    """The orbax manager (created on first use)."""
    if self._manager is None:
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=self._keep, create=True,
              cleanup_tmp_directories=True,
              enable_async_checkpointing=self._async),
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler()})
    return self._manager

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
    self._orbax().save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta)),
        force=True)

  def restore(self, model: nnx.Module, optimizer: nnx.Optimizer,
              step: int | None = None,
              rng_like: jax.Array | None = None,
              log: Callable[[str], None] = logging.warning) -> Restored:
    """Loads a checkpoint into ``model`` and ``optimizer`` in place.

    Without ``step`` it takes the newest complete checkpoint that reads
    back; a corrupt one (a data file truncated or deleted) is reported
    through ``log`` and the next older one is tried.

    Args:
      model: the run's model, its shapes define what is expected.
      optimizer: its optimizer.
      step: which step, default the newest good one.
      rng_like: a key of the saved key's implementation (default
        ``jax.random.key(0)``).
      log: where the notes about skipped corrupt checkpoints go.

    Returns:
      The step, RNG key, data position and extra numbers saved with it.

    Raises:
      CheckpointError: no complete checkpoint, the chosen one is corrupt,
        all are corrupt, or one that does not fit the model, optimizer or
        config; the message names the directory.
    """
    self.wait()
    complete, _ = scan(self.directory)
    if not complete:
      parked = self.directory / PARTIAL_DIR
      partial = sorted(p.name for p in parked.glob("*")
                       ) if parked.is_dir() else []
      what = ("does not exist" if not self.directory.is_dir()
              else "holds no complete checkpoint")
      raise CheckpointError(
          f"cannot resume: checkpoint directory {self.directory} {what}"
          + (f" (partial checkpoints set aside: {partial})" if partial else ""))
    if step is not None:
      if step not in complete:
        raise CheckpointError(
            f"no complete checkpoint for step {step} in {self.directory}; "
            f"complete steps: {complete}")
      return self._restore_step(step, model, optimizer, rng_like)
    corrupt = []
    for candidate in reversed(complete):
      try:
        restored = self._restore_step(candidate, model, optimizer, rng_like)
      except CorruptCheckpointError as e:
        corrupt.append(candidate)
        older = [s for s in complete if s < candidate]
        log(f"{e}; " + (f"falling back to step {older[-1]}" if older
                        else "no older checkpoint is left"))
        continue
      return restored
    raise CheckpointError(
        f"cannot resume: every checkpoint in {self.directory} is corrupt "
        f"(steps {corrupt})")

  def _restore_step(self, step: int, model: nnx.Module,
                    optimizer: nnx.Optimizer,
                    rng_like: jax.Array | None) -> Restored:
    """Restores one step; corrupt files raise ``CorruptCheckpointError``."""
    manager = self._orbax()
    path = self.directory / str(step)
    try:
      meta = manager.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types
      raise CorruptCheckpointError(
          f"checkpoint {path} is corrupt: its metadata does not read back "
          f"({_first_line(e)})") from e
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
      saved = manager.item_metadata(step)["state"]
    except Exception as e:  # orbax raises many types
      raise CorruptCheckpointError(
          f"checkpoint {path} is corrupt: its array metadata does not read "
          f"back ({_first_line(e)})") from e
    if saved is None:
      raise CorruptCheckpointError(
          f"checkpoint {path} is corrupt: it has no array metadata")
    # Shapes are compared before any array is read: a mismatch is refused
    # without starting orbax's readers (which log tracebacks when cut off).
    _check_fit(path, getattr(saved, "tree", saved), abstract)
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # orbax raises many types
      raise CorruptCheckpointError(
          f"checkpoint {path} is corrupt: its arrays do not read back "
          f"({_first_line(e)})") from e
    state = _unsavable(restored["state"], target)
    _update(model, state["model"])
    _update(optimizer, state["optimizer"])
    return Restored(step=int(meta["step"]), rng=state["rng"],
                    data_state=meta["data_state"], extra=meta.get("extra", {}))

  def set_aside_after(self, step: int,
                      log: Callable[[str], None] = logging.warning
                      ) -> list[int]:
    """Moves complete checkpoints newer than ``step`` to ``_set_aside/``.

    A run continued from an older (chosen, or last good) checkpoint writes
    those steps again; the old ones are kept aside, not deleted.

    Returns:
      The steps moved.
    """
    newer = [s for s in scan(self.directory)[0] if s > step]
    if newer:
      self.close()  # orbax caches the step list; a new manager rescans
      for s in newer:
        _move_aside(self.directory, s, SET_ASIDE_DIR)
      log(f"continuing from step {step}: moved the newer checkpoints "
          f"{newer} to {self.directory / SET_ASIDE_DIR}")
    return newer

  def wait(self) -> None:
    """Blocks until background writes are on disk."""
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and stops orbax's background workers."""
    if self._manager is not None:
      self._manager.close()
      self._manager = None

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _by_path(tree) -> dict[str, Any]:
  """Leaves keyed by their path, dict keys and list indices alike as text."""
  def name(key):
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(name(k) for k in path): leaf for path, leaf in leaves}


def _check_fit(path, saved, abstract) -> None:
  """Refuses a checkpoint whose arrays differ from ``abstract`` in name,
  shape or dtype, reading only its metadata."""
  saved, wanted = _by_path(saved), _by_path(abstract)
  bad = [f"{k}: missing in the checkpoint" for k in wanted if k not in saved]
  bad += [f"{k}: not in this model/optimizer" for k in saved
          if k not in wanted]
  for k in wanted.keys() & saved.keys():
    s, a = saved[k], wanted[k]
    shape, dtype = tuple(getattr(s, "shape", ())), getattr(s, "dtype", None)
    if shape != tuple(a.shape) or (dtype is not None
                                   and np.dtype(dtype) != a.dtype):
      bad.append(f"{k}: saved {dtype}{list(shape)}, expected "
                 f"{a.dtype}{list(a.shape)}")
  if bad:
    raise CheckpointError(
        f"checkpoint {path} does not fit this model/optimizer: "
        + "; ".join(sorted(bad)[:5]))


def _update(node, pure: dict[str, Any]) -> None:
  state = nnx.state(node)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(node, state)
