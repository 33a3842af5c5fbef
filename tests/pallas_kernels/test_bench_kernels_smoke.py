"""experiments/bench_kernels.py --smoke runs end to end; rows accumulate."""

import json
import math
import os
import subprocess
import sys

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
