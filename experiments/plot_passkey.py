"""Side-by-side passkey heatmaps from the printed grids of probe runs.

  python experiments/plot_passkey.py pk_nsa.txt pk_full.txt \
      --label NSA --label full --out passkey.png

Reads the final "T <length> depth <depth>: accuracy <share>" lines that
``passkey_probe.py`` prints (its stdout saved to a file), one heatmap per
log (length x depth, whole-key accuracy), drawn by
``nsa_jax.train.plot_heatmaps``. Every log must cover the same lengths
and depths.
"""

from __future__ import annotations

import argparse
import pathlib
import re

import numpy as np

from nsa_jax import train

_CELL = re.compile(r"^T (\d+) depth ([\d.]+): accuracy ([\d.]+)")


def read_grid(path) -> tuple[list[int], list[float], np.ndarray]:
  """(lengths, depths, accuracy [depths, lengths]) of one probe log."""
  cells = {}
  for line in pathlib.Path(path).read_text().splitlines():
    match = _CELL.match(line)
    if match:
      cells[int(match[1]), float(match[2])] = float(match[3])
  if not cells:
    raise ValueError(f"{path}: no 'T <length> depth <depth>: accuracy' "
                     "lines (the end of a passkey_probe.py run)")
  lengths = sorted({t for t, _ in cells})
  depths = sorted({d for _, d in cells})
  missing = [(t, d) for t in lengths for d in depths if (t, d) not in cells]
  if missing:
    raise ValueError(f"{path}: no accuracy for (length, depth) {missing}")
  grid = np.array([[cells[t, d] for t in lengths] for d in depths])
  return lengths, depths, grid


def main(argv=None) -> pathlib.Path:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("logs", nargs="+", help="saved passkey_probe.py output")
  parser.add_argument("--label", action="append", default=None,
                      help="a panel's title, once per log in order "
                      "(default: the file names)")
  parser.add_argument("--out", required=True, help="PNG path")
  parser.add_argument("--title", default="passkey retrieval, whole keys")
  args = parser.parse_args(argv)
  labels = args.label or [pathlib.Path(p).stem for p in args.logs]
  if len(labels) != len(args.logs) or len(set(labels)) != len(labels):
    parser.error(f"--label needs {len(args.logs)} distinct names, one per "
                 f"log, got {labels}")
  try:
    grids = [read_grid(p) for p in args.logs]
  except (OSError, ValueError) as e:
    parser.error(str(e))
  lengths, depths, _ = grids[0]
  for path, (other_lengths, other_depths, _) in zip(args.logs, grids):
    if (other_lengths, other_depths) != (lengths, depths):
      parser.error(f"{path} covers lengths {other_lengths} and depths "
                   f"{other_depths}, {args.logs[0]} {lengths} and {depths}")
  path = train.plot_heatmaps(
      {label: grid for label, (_, _, grid) in zip(labels, grids)}, lengths,
      depths, args.out, title=args.title)
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
