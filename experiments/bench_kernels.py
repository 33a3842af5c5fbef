"""NSA (Pallas kernels) against dense causal attention on a GPU.

  python experiments/bench_kernels.py                  # all shapes, 8k-128k
  python experiments/bench_kernels.py --shapes 64/4/128/128 --seq-lens 65536
  python experiments/bench_kernels.py --plot-only      # redraw the plot
  python experiments/bench_kernels.py --tune           # time launch candidates
  python experiments/bench_kernels.py --smoke          # CPU, interpret

Per shape: full NSA (``ops.nsa_attention(impl="pallas")``) against cuDNN's
fused attention and the Pallas Triton flash attention, forward and
forward+backward, then where NSA's time goes at ``--profile-len`` (each op
alone, TFLOP/s and % of the measured matmul peak). Rows accumulate in
``<out>/bench_rows.json`` across runs, and the plot is drawn from all of them.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

from nsa_jax import benchmark
from nsa_jax.config import NSAConfig

DEFAULT_SHAPES = "64/4/128/128,64/4/192/128,32/8/128/128"


def parse_shapes(text: str):
  """"Hq/Hkv/Dk/Dv,..." -> [Shape]."""
  shapes = []
  for item in text.split(","):
    parts = item.strip().split("/")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
      raise SystemExit(f"--shapes: {item!r} is not Hq/Hkv/Dk/Dv "
                       "(four positive integers)")
    shape = benchmark.Shape(*map(int, parts))
    if shape.hq % shape.hkv:
      raise SystemExit(f"--shapes: Hq={shape.hq} is not a multiple of "
                       f"Hkv={shape.hkv}")
    shapes.append(shape)
  return shapes


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                      help="Hq/Hkv/Dk/Dv,... (default: %(default)s)")
  parser.add_argument("--seq-lens", type=int, nargs="+",
                      default=[8192, 16384, 32768, 65536, 131072])
  parser.add_argument("--profile-len", type=int, default=65536,
                      help="T of the per-op table; 0 skips it")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", default="outputs/bench_kernels")
  parser.add_argument("--plot-only", action="store_true")
  parser.add_argument("--tune", action="store_true",
                      help="time the launch candidates of each kernel at "
                      "--profile-len instead of the sweep")
  parser.add_argument("--tune-kernels", default="compressed,selected,"
                      "block_scores")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shape on the CPU in interpret mode")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  rows_path = os.path.join(args.out, "bench_rows.json")
  plot_path = os.path.join(args.out, "speedup_vs_t.png")
  kind = jax.devices()[0].device_kind
  if args.plot_only:
    benchmark.plot_speedups(benchmark.load_rows(rows_path), plot_path,
                            f"NSA (Pallas) vs dense causal attention, {kind}")
    print(f"wrote {plot_path}")
    return
  print(f"jax {jax.__version__}, {kind}", flush=True)
  log = lambda line: print(line, flush=True)
  if args.smoke:
    shapes, seq_lens = [benchmark.Shape(4, 2, 16, 16)], [64]
    config, dtype, interpret = NSAConfig.tiny(), jnp.float32, True
    iters, reps, profile_len, peak = 1, 1, 64, float("nan")
  else:
    shapes, seq_lens = parse_shapes(args.shapes), args.seq_lens
    config, dtype, interpret = NSAConfig.paper(), jnp.bfloat16, False
    iters, reps, profile_len = args.iters, args.reps, args.profile_len
    peak = benchmark.measured_peak_tflops()
    print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s", flush=True)
  if args.tune:
    for shape in shapes:
      benchmark.tune(shape, profile_len, config, dtype,
                     kernels=args.tune_kernels.split(","), log=log)
    return
  rows = benchmark.run_sweep(shapes, seq_lens, config, dtype, iters=iters,
                             reps=reps, interpret=interpret, log=log)
  print("\n" + benchmark.speedup_table(rows), flush=True)
  if profile_len:
    for shape in shapes:
      print(f"\nWhere the time goes, {shape}, T={profile_len}:", flush=True)
      benchmark.profile_ops(shape, profile_len, config, dtype, peak=peak,
                            iters=iters, reps=reps, log=log)
  all_rows = benchmark.save_rows(rows_path, rows)
  benchmark.plot_speedups(all_rows, plot_path,
                          f"NSA (Pallas) vs dense causal attention, {kind}")
  print(f"wrote {rows_path} and {plot_path}")


if __name__ == "__main__":
  main()
