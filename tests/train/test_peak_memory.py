"""Peak device memory in train rows, the run result and the summary."""

import jax
import numpy as np
import pytest

from nsa_jax import data
from nsa_jax import train
from nsa_jax.train import loop
from nsa_jax.train import metrics
from nsa_jax.train import runs

GIB = 2**30


class _Device:

  def __init__(self, stats=None, error=None):
    self.stats, self.error = stats, error

  def memory_stats(self):
    if self.error:
      raise self.error
    return self.stats


@pytest.mark.parametrize("device,want", [
    (_Device(None), None),  # the CPU backend
    (_Device({}), None),
    (_Device({"bytes_in_use": 5}), None),
    (_Device(error=NotImplementedError("no stats")), None),
    (_Device({"peak_bytes_in_use": 3 * GIB, "bytes_in_use": 5}), 3 * GIB),
])
def test_peak_bytes_in_use(device, want):
  assert metrics.peak_bytes_in_use(device) == want


def test_this_backend():
  peak = metrics.peak_bytes_in_use()
  if jax.default_backend() == "cpu":
    assert peak is None
  else:
    assert peak is None or peak > 0


def test_format_bytes():
  assert metrics.format_bytes(None) == "-"
  assert metrics.format_bytes(3 * GIB) == "3.0 GiB"
  assert metrics.format_bytes(int(1.25 * GIB), shared=True) == "<= 1.2 GiB"


def test_peak_of_rows():
  rows = [{"kind": "eval", "step": 2, "val_loss": 1.0},
          {"kind": "train", "step": 1, "peak_bytes": 5, "peak_shared": True},
          {"kind": "train", "step": 2, "peak_bytes": 9, "peak_shared": False},
          {"kind": "train", "step": 3, "peak_bytes": 9, "peak_shared": False}]
  assert loop.peak_of_rows(rows) == (9, False)
  assert loop.peak_of_rows(rows[:2]) == (5, True)
  old = [{"kind": "train", "step": 1, "loss": 2.0}]  # written before peaks
  assert loop.peak_of_rows(old) == (None, False)


def _train(make_lm, workdir, steps=3, resume=False):
  cfg = train.TrainConfig(steps=steps, batch_size=2, seq_len=16,
                          warmup_steps=0, log_every=1, eval_every=0,
                          progress=False)
  it = data.PackedIterator(np.arange(500) % 256, 2, 16)
  return train.train(make_lm(), cfg, it, workdir, resume=resume,
                     log=lambda _: None)


def test_no_memory_statistics_on_cpu_is_handled(tmp_path, make_lm,
                                                monkeypatch):
  monkeypatch.setattr(metrics, "peak_bytes_in_use", lambda device=None: None)
  result = _train(make_lm, tmp_path)
  assert result.peak_bytes is None and not result.peak_shared
  rows = [r for r in train.read_metrics(result.metrics_path)
          if r["kind"] == "train"]
  assert rows and all(r["peak_bytes"] is None for r in rows)
  table = runs.summarize({"full": {
      "params": 10, "steps": 3, "loss": result.final_loss, "val_loss": None,
      "train_s": result.train_s, "peak_bytes": None, "peak_shared": False,
      "metrics": str(result.metrics_path)}})
  assert "peak memory" in table.splitlines()[0]
  assert table.splitlines()[-1].endswith("| - |")


@pytest.mark.parametrize("earlier,own,want", [
    (1 * GIB, 4 * GIB, "4.0 GiB"),     # this run set the peak: exact
    (6 * GIB, 6 * GIB, "<= 6.0 GiB"),  # an earlier run's peak: a bound
])
def test_peak_is_recorded_and_printed(tmp_path, make_lm, monkeypatch,
                                      earlier, own, want):
  readings = iter([earlier] + [own] * 100)
  monkeypatch.setattr(metrics, "peak_bytes_in_use",
                      lambda device=None: next(readings))
  result = _train(make_lm, tmp_path)
  assert result.peak_bytes == own
  assert result.peak_shared == (earlier == own)
  rows = [r for r in train.read_metrics(result.metrics_path)
          if r["kind"] == "train"]
  assert [r["peak_bytes"] for r in rows] == [own] * 3
  entry = {"params": 10, "steps": 3, "loss": result.final_loss,
           "val_loss": None, "train_s": result.train_s,
           "peak_bytes": result.peak_bytes,
           "peak_shared": result.peak_shared,
           "metrics": str(result.metrics_path)}
  assert runs.summarize({"nsa": entry}).splitlines()[-1].endswith(
      f"| {want} |")
  # A finished run reported again reads its peak from the metrics rows.
  again = _train(make_lm, tmp_path, resume=True)
  assert again.start_step == 3
  assert (again.peak_bytes, again.peak_shared) == (own, earlier == own)
