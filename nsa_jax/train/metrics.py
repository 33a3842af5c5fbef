"""Metrics as JSON lines (train and eval rows); the device's peak memory."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """All rows of a metrics file, in order; a torn last line is skipped."""
  rows = []
  for line in pathlib.Path(path).read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # a run killed mid-write leaves at most one torn line
  return rows


class MetricsWriter:
  """Appends rows to ``path``, flushed at once so a crash loses nothing.

  Args:
    path: the ``.jsonl`` file.
    resume_step: ``None`` starts a fresh file; an int keeps the rows with
      ``step <= resume_step`` (those a resumed run does not redo) and drops
      the rest, so a resumed run's file reads like an uninterrupted one.
  """

  def __init__(self, path: str | pathlib.Path,
               resume_step: int | None = None):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if resume_step is not None and self.path.exists():
      kept = [r for r in read_metrics(self.path)
              if r.get("step", 0) <= resume_step]
    with self.path.open("w") as f:
      for row in kept:
        f.write(json.dumps(row) + "\n")
    self._file = self.path.open("a")

  def write(self, row: dict[str, Any]) -> None:
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def peak_bytes_in_use(device=None) -> int | None:
  """The device's peak allocated bytes since the process started, or None.

  Read from ``device.memory_stats()["peak_bytes_in_use"]`` (default
  ``jax.local_devices()[0]``); None where the backend keeps no such
  statistics (the CPU backend returns no stats). jax offers no reset: a
  second run in the same process sees the first run's peak too.
  """
  if device is None:
    device = jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):
    return None
  if not stats or stats.get("peak_bytes_in_use") is None:
    return None
  return int(stats["peak_bytes_in_use"])


def format_bytes(value: int | None, shared: bool = False) -> str:
  """GiB with one decimal; "-" for None; "<=" when the peak is an upper
  bound (reached before the run started, in the same process)."""
  if value is None:
    return "-"
  return f"{'<= ' if shared else ''}{value / 2**30:.1f} GiB"
