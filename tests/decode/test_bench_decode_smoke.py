"""experiments/bench_decode.py --smoke runs on a CPU and writes its rows."""

import json

import experiment_scripts
import jax

from nsa_jax import NSAConfig
from nsa_jax.benchmark import Shape
from nsa_jax.decode import benchmark as bench


def test_smoke_run_writes_attention_and_model_rows(tmp_path, capsys):
  module = experiment_scripts.load("bench_decode")
  out = tmp_path / "rows.json"
  png = tmp_path / "rows.png"
  rows = module.main(["--smoke", "--iters", "1", "--out", str(out),
                      "--plot", str(png), "--profile"])
  assert png.stat().st_size > 1000
  assert {r["method"] for r in rows} == {"nsa_xla", "dense_xla"}
  assert all(r["error"] is None and r["ms"] > 0 for r in rows)
  # --profile traced each NSA row (no device track on a CPU: empty).
  assert all(("kernels_us" in r) == (r["method"] == "nsa_xla") for r in rows)
  saved = json.loads(out.read_text())
  assert len(saved["model"]) == 4  # nsa/full x 2 contexts x 1 batch
  printed = capsys.readouterr().out
  assert "| speedup |" in printed
  if jax.default_backend() == "cpu":
    assert "no device kernels traced" in printed


def test_bytes_per_step():
  config = NSAConfig.paper()
  shape = Shape(64, 4, 128, 128)
  per_token = 4 * 256 * 2  # Hkv * (Dk + Dv) * bf16
  # 64k: 4095 compressed + 16 * 64 selected + 512 window = 5631 tokens, the
  # paper's ~5.6k of 65,536.
  assert bench.nsa_bytes(shape, 65536, config, 1, 2) == 5631 * per_token
  assert bench.dense_bytes(shape, 65536, 16, 2) == 16 * 65536 * per_token


def test_kernel_table_folds_small_kernels():
  row = dict(shape=dict(hq=4, hkv=2, dk=16, dv=16), context=64, batch=2,
             method="nsa_pallas",
             kernels_us={"decode_top_n": 5.0, "fusion_1": 0.2,
                         "fusion_2": 0.1})
  table = bench.kernel_table([row, dict(row, kernels_us={})])
  assert "| decode_top_n | 5.0 |" in table
  assert "| 2 others under 0.5 us | 0.3 |" in table
  assert "| all | 5.3 |" in table
  assert "fusion_1" not in table
  assert bench.kernel_table([]).startswith("no device kernels")
