"""experiments/bench_kernels.py --smoke runs end to end; rows accumulate."""

import json
import math
import os
import subprocess
import sys

import experiment_scripts
import numpy as np

from nsa_jax import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_smoke(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "bench_kernels.py"),
         "--smoke", "--out", str(tmp_path)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                       check=True, timeout=600).stdout
  assert "nsa_pallas" in out and "pallas_mha" in out
  assert "selected_attention" in out and "select_blocks" in out
  assert (tmp_path / "speedup_vs_t.png").stat().st_size > 0
  rows = json.loads((tmp_path / "bench_rows.json").read_text())
  assert {r["method"] for r in rows} == {"nsa_pallas", "cudnn", "pallas_mha"}


def test_saved_rows_merge(tmp_path):
  path = str(tmp_path / "rows.json")
  shape = benchmark.Shape(4, 2, 16, 16)
  row = lambda t, ms: dict(shape=shape, seq_len=t, method="cudnn",
                           mode="fwd", ms=ms, note="")
  benchmark.save_rows(path, [row(64, 1.0), row(128, 2.0)])
  merged = benchmark.save_rows(path, [row(128, 3.0), row(256, math.nan)])
  loaded = benchmark.load_rows(path)
  assert len(merged) == len(loaded) == 3
  by_t = {r["seq_len"]: r["ms"] for r in loaded}
  assert by_t[64] == 1.0 and by_t[128] == 3.0 and math.isnan(by_t[256])
  assert loaded[0]["shape"] == shape


def test_table_overlap_counts_shared_and_distinct_blocks():
  # One batch row, one kv head, 4 positions of 3 slots (-1: empty).
  idx = np.array([[0, -1, -1], [0, 1, -1], [0, 1, 2], [3, 1, 2]])
  overlap = benchmark.table_overlap(idx[None, :, None, :], 2)
  assert overlap["blocks_per_query"] == (1 + 2 + 3 + 3) / 4
  # Shared with the previous query: 1/2 (t=1), 2/3 (t=2), 2/3 (t=3).
  np.testing.assert_allclose(overlap["shared_with_prev"],
                             (1 / 2 + 2 / 3 + 2 / 3) / 3)
  # Tiles {t0, t1} and {t2, t3}: distinct blocks {0, 1} and {0, 1, 2, 3}.
  assert overlap["distinct_per_tile"] == (2 + 4) / 2


def test_selected_passes_bench_runs_every_path(capsys):
  bench = experiment_scripts.load("bench_selected_passes")
  (row,) = bench.main(["--cases", "1x192:4/1/16", "--iters", "1", "--reps",
                       "1"])
  for name in ("fwd_tiles", "fwd_blocks", *bench.PATHS):
    assert row[name] > 0
  # bf16 partials and shares: a few roundings more than the query tiles.
  assert 0 < row["max_out"] and row["out_diff"] <= 0.02 * row["max_out"]
  assert 0 < row["max_dq"] and row["dq_diff"] <= 0.02 * row["max_dq"]
  assert "| 1 x 192 |" in capsys.readouterr().out
