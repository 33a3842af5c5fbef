"""Tests of the JSONL metrics and the loss-curve plot."""

import pytest

from nsa_jax import train


def _rows(n):
  return [{"kind": "train", "step": s, "loss": 5.0 / s, "train_s": 0.1 * s}
          for s in range(1, n + 1)]


def test_resume_drops_rows_after_the_checkpoint(tmp_path):
  path = tmp_path / "m.jsonl"
  writer = train.MetricsWriter(path)
  for row in _rows(6):
    writer.write(row)
  writer.close()
  with path.open("a") as f:
    f.write('{"kind": "tra')  # torn by a kill
  writer = train.MetricsWriter(path, resume_step=4)
  writer.write({"kind": "train", "step": 5, "loss": 0.0, "train_s": 1.0})
  writer.close()
  steps = [r["step"] for r in train.read_metrics(path)]
  assert steps == [1, 2, 3, 4, 5]
  fresh = train.MetricsWriter(path)
  fresh.close()
  assert not train.read_metrics(path)


def test_plot_runs_writes_png(tmp_path):
  runs = {}
  for name in ("nsa", "full"):
    writer = train.MetricsWriter(tmp_path / name / "metrics.jsonl")
    for row in _rows(5):
      writer.write(row)
    writer.write({"kind": "eval", "step": 5, "val_loss": 1.0, "train_s": 0.5})
    writer.close()
    runs[name] = writer.path
  png = train.plot_runs(runs, tmp_path / "out" / "curves.png", title="t")
  assert png.stat().st_size > 1000
  with pytest.raises(FileNotFoundError, match="nope"):
    train.plot_runs({"x": tmp_path / "nope.jsonl"}, tmp_path / "x.png")
