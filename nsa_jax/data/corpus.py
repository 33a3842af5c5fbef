"""An offline code corpus: the Python standard library's own ``.py`` files."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig

import numpy as np

from nsa_jax.data import tokenizer

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Byte-level token streams, split into train and validation by file.

  Attributes:
    train: uint8 [N_train], the train files' bytes joined by ``DOC_SEP``.
    val: uint8 [N_val], the validation files' bytes joined by ``DOC_SEP``.
    train_files: paths (relative to ``source``) in ``train``, in order.
    val_files: paths (relative to ``source``) in ``val``, in order.
    source: the directory the files came from.
  """

  train: np.ndarray
  val: np.ndarray
  train_files: tuple[str, ...]
  val_files: tuple[str, ...]
  source: str

  def summary(self) -> str:
    return (f"corpus {self.source}: train {len(self.train_files)} files "
            f"{self.train.size / 1e6:.2f}M bytes, val {len(self.val_files)} "
            f"files {self.val.size / 1e6:.2f}M bytes")


def stdlib_dir() -> pathlib.Path:
  """The directory of the running Python's standard library (via sysconfig)."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_python_files(source: str | pathlib.Path) -> list[pathlib.Path]:
  """Sorted ``.py`` files under ``source``, third-party packages excluded.

  Raises:
    FileNotFoundError: ``source`` is not a directory.
  """
  root = pathlib.Path(source)
  if not root.is_dir():
    raise FileNotFoundError(f"corpus source {str(root)!r} is not a directory")
  files = [
      path for path in root.rglob("*.py")
      if path.is_file()
      and not _SKIP_DIRS.intersection(path.relative_to(root).parts)
  ]
  return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_validation(relative: str, val_fraction: float) -> bool:
  """A stable split by file: a hash of the path, independent of file order."""
  digest = hashlib.sha256(relative.encode()).digest()
  return int.from_bytes(digest[:8], "little") / 2.0**64 < val_fraction


def build_corpus(source: str | pathlib.Path | None = None, *,
                 val_fraction: float = 0.05,
                 max_bytes: int | None = None) -> Corpus:
  """Reads every ``.py`` file under ``source`` into byte-level token streams.

  Files are split into train and validation by a hash of their relative path,
  so the split never depends on which other files exist. Nothing is
  downloaded.

  Args:
    source: directory to read; defaults to the standard library
      (``stdlib_dir()``).
    val_fraction: share of files, in (0, 1), that go to validation.
    max_bytes: optional cap on the bytes read, for quick runs: files are
      taken in sorted order until train holds about ``(1 - val_fraction) *
      max_bytes`` and validation ``val_fraction * max_bytes`` bytes.

  Returns:
    A ``Corpus`` with non-empty ``train`` and ``val`` streams.

  Raises:
    ValueError: bad arguments, no ``.py`` files, or a split left empty.
    FileNotFoundError: ``source`` is not a directory.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  if max_bytes is not None and max_bytes <= 0:
    raise ValueError(f"max_bytes must be positive, got {max_bytes}")
  root = pathlib.Path(source) if source is not None else stdlib_dir()
  files = list_python_files(root)
  train_docs, val_docs, train_files, val_files = [], [], [], []
  budget = {False: float("inf"), True: float("inf")}  # keyed by is-validation
  if max_bytes is not None:
    budget = {False: max_bytes * (1 - val_fraction),
              True: max(max_bytes * val_fraction, 1)}
  used = {False: 0, True: 0}
  for path in files:
    relative = path.relative_to(root).as_posix()
    is_val = _is_validation(relative, val_fraction)
    if used[is_val] >= budget[is_val]:
      if all(used[k] >= budget[k] for k in budget):
        break
      continue
    data = path.read_bytes()
    if not data.strip():
      continue
    (val_docs if is_val else train_docs).append(data)
    (val_files if is_val else train_files).append(relative)
    used[is_val] += len(data)
  if not train_docs and not val_docs:
    raise ValueError(
        f"corpus source {str(root)!r} holds no non-empty .py files "
        f"({len(files)} .py files found)")
  if not train_docs or not val_docs:
    raise ValueError(
        f"corpus source {str(root)!r}: {len(train_docs)} train and "
        f"{len(val_docs)} validation files with val_fraction={val_fraction}; "
        "both splits need at least one file (add files or change the "
        "fraction)")
  return Corpus(
      train=tokenizer.encode_documents(train_docs),
      val=tokenizer.encode_documents(val_docs),
      train_files=tuple(train_files),
      val_files=tuple(val_files),
      source=str(root),
  )
