"""Deterministic, seedable batch iterators whose position is a small dict.

Batch ``s`` is a pure function of ``(seed, s)``, so the whole position of an
iterator is ``state() == {"step": s, ...}``: it is saved as JSON next to a
checkpoint and ``restore``d on resume. A batch is a dict of numpy arrays:
``inputs`` int32 [B, T], ``targets`` int32 [B, T], ``mask`` float32 [B, T],
and, from a packed stream with ``documents=True``, ``segment_ids`` int32
[B, T] (``tokenizer.document_ids`` of the inputs), which the train step
hands to the model so attention stays inside each document.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from nsa_jax.data import synthetic
from nsa_jax.data import tokenizer

Batch = dict[str, np.ndarray]


class StepIterator:
  """Base class: ``next()`` yields ``batch_at(step)`` and advances ``step``."""

  kind = "base"

  def __init__(self, batch_size: int, seq_len: int, seed: int):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seq_len < 1:
      raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    self.batch_size = batch_size
    self.seq_len = seq_len
    self.seed = seed
    self.step = 0

  def batch_at(self, step: int) -> Batch:
    raise NotImplementedError

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def state(self) -> dict[str, Any]:
    """The position and identity, JSON-serialisable."""
    return {"kind": self.kind, "step": self.step, "seed": self.seed,
            "batch_size": self.batch_size, "seq_len": self.seq_len}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from ``state``; it must come from an identical iterator.

    Raises:
      ValueError: ``state`` belongs to an iterator with other settings.
    """
    mine = self.state()
    diff = {k: (state.get(k), mine[k]) for k in mine
            if k != "step" and state.get(k) != mine[k]}
    if diff:
      raise ValueError(
          "data iterator state does not match this iterator "
          f"(saved, current): {diff}")
    step = state.get("step")
    if not isinstance(step, int) or step < 0:
      raise ValueError(f"data iterator state has a bad step: {step!r}")
    self.step = step


class PackedIterator(StepIterator):
  """Random non-overlapping windows of a packed token stream, epoch by epoch.

  The stream is cut into ``C = (len - 1) // T`` windows of ``T + 1`` tokens
  (overlapping by one); every epoch visits all of them in a fresh order
  drawn from ``(seed, epoch)``. With ``documents=True`` batches carry
  ``segment_ids``: the stream's ``DOC_SEP`` tokens split a window into its
  documents (losses are scored as before, on every target).
  """

  kind = "packed"

  def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int,
               seed: int = 0, documents: bool = False):
    super().__init__(batch_size, seq_len, seed)
    self.documents = bool(documents)
    self.stream = np.asarray(stream)
    self.num_windows = (self.stream.size - 1) // seq_len
    if self.num_windows < 1:
      raise ValueError(
          f"a stream of {self.stream.size} tokens holds no window of "
          f"seq_len + 1 = {seq_len + 1} tokens")

    self._orders: dict[int, np.ndarray] = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) > 2:
        self._orders.clear()
      self._orders[epoch] = np.random.default_rng(
          [self.seed, epoch]).permutation(self.num_windows)
    return self._orders[epoch]

  def batch_at(self, step: int) -> Batch:
    rows = []
    for i in range(step * self.batch_size, (step + 1) * self.batch_size):
      epoch, j = divmod(i, self.num_windows)
      start = int(self._order(epoch)[j]) * self.seq_len
      rows.append(self.stream[start:start + self.seq_len + 1])
    return _lm_batch(np.stack(rows), self.documents)

  def state(self) -> dict[str, Any]:
    state = {**super().state(), "stream_size": int(self.stream.size)}
    if self.documents:  # absent when off: states saved before it still fit
      state["documents"] = True
    return state


def _lm_batch(windows: np.ndarray, documents: bool = False) -> Batch:
  windows = windows.astype(np.int32)
  batch = {"inputs": windows[:, :-1], "targets": windows[:, 1:],
           "mask": np.ones(windows[:, 1:].shape, np.float32)}
  if documents:
    batch["segment_ids"] = tokenizer.document_ids(batch["inputs"])
  return batch


def eval_batches(stream: np.ndarray, batch_size: int, seq_len: int,
                 num_batches: int, documents: bool = False) -> list[Batch]:
  """A fixed validation set: windows spread evenly over ``stream``.

  Args:
    stream: the packed token stream.
    batch_size, seq_len: B, T.
    num_batches: batches in the set.
    documents: add ``segment_ids``, as ``PackedIterator`` does.

  Raises:
    ValueError: the stream is shorter than one window.
  """
  stream = np.asarray(stream)
  num_windows = (stream.size - 1) // seq_len
  if num_windows < 1:
    raise ValueError(
        f"validation stream of {stream.size} tokens is shorter than one "
        f"window of {seq_len + 1} tokens")
  count = num_batches * batch_size
  starts = np.linspace(0, num_windows - 1, count).round().astype(int) * seq_len
  windows = np.stack([stream[s:s + seq_len + 1] for s in starts])
  return [_lm_batch(windows[i:i + batch_size], documents)
          for i in range(0, count, batch_size)]


class SyntheticIterator(StepIterator):
  """Batches of a synthetic task, example ``b`` of batch ``s`` from (seed, s).

  Args:
    task: ``"passkey"`` (random depth per example) or ``"mqar"``.
    batch_size: B.
    seq_len: T.
    seed: base seed.
    **task_kwargs: passed to the example function (e.g. ``num_pairs``).
  """

  kind = "synthetic"

  def __init__(self, task: str, batch_size: int, seq_len: int, seed: int = 0,
               **task_kwargs):
    super().__init__(batch_size, seq_len, seed)
    self.task = task
    self.task_kwargs = dict(sorted(task_kwargs.items()))
    self._make = _task_fn(task, seq_len, self.task_kwargs)
    self._make(np.random.default_rng(0))  # fail early on bad sizes

  def batch_at(self, step: int) -> Batch:
    rng = np.random.default_rng([self.seed, step])
    return synthetic.stack_examples(
        [self._make(rng) for _ in range(self.batch_size)])

  def state(self) -> dict[str, Any]:
    return {**super().state(), "task": self.task,
            "task_kwargs": self.task_kwargs}


def _task_fn(task: str, seq_len: int,
             kwargs: dict[str, Any]) -> Callable[[np.random.Generator],
                                                 synthetic.Example]:
  if task == "passkey":
    return lambda rng: synthetic.passkey_example(
        rng, seq_len, depth=float(rng.uniform()), **kwargs)
  if task == "mqar":
    return lambda rng: synthetic.mqar_example(rng, seq_len, **kwargs)
  raise ValueError(f"unknown synthetic task {task!r}; use 'passkey' or 'mqar'")


class MixedIterator(StepIterator):
  """Batches of ``base`` whose first rows are replaced by ``extra``'s rows.

  Used to mix, e.g., passkey examples into code so that one model can be
  scored on retrieval. Both iterators advance together. When ``base``
  yields ``segment_ids``, the mixed rows' ids are recomputed from their
  inputs (a synthetic example is one document).

  Args:
    base: the main iterator (sets batch size and sequence length).
    extra: an iterator of the same sequence length.
    extra_rows: rows per batch taken from ``extra`` (<= its batch size and
      < ``base.batch_size``).
  """

  kind = "mixed"

  def __init__(self, base: StepIterator, extra: StepIterator, extra_rows: int):
    super().__init__(base.batch_size, base.seq_len, base.seed)
    if extra.seq_len != base.seq_len:
      raise ValueError(f"{extra.seq_len=} differs from {base.seq_len=}")
    if not 0 <= extra_rows <= min(extra.batch_size, base.batch_size - 1):
      raise ValueError(
          f"extra_rows={extra_rows} must be in [0, min({extra.batch_size}, "
          f"{base.batch_size - 1})]")
    self.base, self.extra, self.extra_rows = base, extra, extra_rows

  def batch_at(self, step: int) -> Batch:
    batch = {k: v.copy() for k, v in self.base.batch_at(step).items()}
    if self.extra_rows:
      extra = self.extra.batch_at(step)
      for k in ("inputs", "targets", "mask"):
        batch[k][:self.extra_rows] = extra[k][:self.extra_rows]
      if "segment_ids" in batch:
        batch["segment_ids"] = tokenizer.document_ids(batch["inputs"])
    return batch

  def state(self) -> dict[str, Any]:
    return {**super().state(), "extra_rows": self.extra_rows,
            "base": {**self.base.state(), "step": None},
            "extra": {**self.extra.state(), "step": None}}
