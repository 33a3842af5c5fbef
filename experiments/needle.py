"""Passkey retrieval accuracy over context length x needle depth.

  python experiments/needle.py --workdir runs/cpu-demo
  python experiments/needle.py --workdir runs/gpu-8k --lengths 2048,8192,16384

For every attention type trained by ``train_lm.py`` in ``--workdir`` it loads
its newest good checkpoint, scores ``--samples`` passkey examples per
cell, prints the grid and the share of each key digit predicted (first
digit right and the rest near chance: the model finds the needle but does
not copy the key) and writes ``<workdir>/needle.png`` and
``needle.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from nsa_jax import train as train_lib


def _floats(text: str) -> list[float]:
  values = [float(x) for x in text.split(",") if x]
  if not values or any(not 0.0 <= v <= 1.0 for v in values):
    raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got {text!r}")
  return values


def _ints(text: str) -> list[int]:
  values = [int(x) for x in text.split(",") if x]
  if not values or any(v < 128 for v in values):
    raise argparse.ArgumentTypeError(
        f"lengths must be >= 128 (a passkey prompt needs ~110), got {text!r}")
  return values


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
  parser = argparse.ArgumentParser(
      description=__doc__, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/cpu-demo")
  parser.add_argument("--attention", default="nsa,full")
  parser.add_argument("--lengths", type=_ints, default=[256, 512, 1024])
  parser.add_argument("--depths", type=_floats,
                      default=[0.0, 0.25, 0.5, 0.75, 1.0])
  parser.add_argument("--samples", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None,
                      help="PNG path (default <workdir>/needle.png)")
  args = parser.parse_args(argv)
  if args.samples < 1:
    parser.error(f"--samples must be >= 1, got {args.samples}")
  workdir = pathlib.Path(args.workdir)
  grids, digits = {}, {}
  for name, model in train_lib.runs.load_runs_or_exit(workdir,
                                                       args.attention):
    hits = train_lib.hits_grid(model, args.lengths, args.depths,
                               samples=args.samples, seed=args.seed)
    grid = grids[name] = hits.all(-1).mean(-1)
    digits[name] = hits.mean((0, 1, 2))
    print(f"\n{name}: accuracy, rows = depth, columns = context length")
    print("depth  " + " ".join(f"{t:>6d}" for t in args.lengths))
    for depth, row in zip(args.depths, grid):
      print(f"{depth:5.2f}  " + " ".join(f"{v:6.2f}" for v in row))
    print("each key digit, share predicted over all cells: "
          + " ".join(f"{v:.2f}" for v in digits[name]))
  (workdir / "needle.json").write_text(json.dumps(
      {"lengths": args.lengths, "depths": args.depths,
       "samples": args.samples,
       "accuracy": {k: v.tolist() for k, v in grids.items()},
       "digit_accuracy": {k: v.tolist() for k, v in digits.items()}},
      indent=1))
  png = train_lib.plot_heatmaps(
      grids, args.lengths, args.depths,
      args.out or workdir / "needle.png",
      title=f"passkey accuracy, {args.samples} samples per cell ({workdir})")
  print(f"wrote {png}")
  return grids


if __name__ == "__main__":
  main()
