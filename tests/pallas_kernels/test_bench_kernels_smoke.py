"""experiments/bench_kernels.py --smoke runs end to end (CPU, interpret)."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_smoke(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location(
      "bench_kernels", os.path.join(ROOT, "experiments", "bench_kernels.py"))
  bench = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = bench  # dataclasses look their module up
  spec.loader.exec_module(bench)
  bench.main(["--smoke", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "nsa_pallas" in out and "pallas_mha" in out and "selected" in out
  assert (tmp_path / "speedup_vs_t.png").stat().st_size > 0
