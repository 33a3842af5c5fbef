"""Loss curves of several runs, per step and per wall-clock second."""

from __future__ import annotations

from collections.abc import Mapping
import pathlib

from matplotlib.figure import Figure
import numpy as np

from nsa_jax.train.metrics import read_metrics


def _series(rows, kind, key, x):
  pts = [(r[x], r[key]) for r in rows
         if r.get("kind") == kind and r.get(key) is not None]
  return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: Mapping[str, str | pathlib.Path],
              out_path: str | pathlib.Path, *, title: str = "") -> pathlib.Path:
  """Draws train and validation loss against step and against train seconds.

  Args:
    runs: label -> metrics ``.jsonl`` path (as written by ``train``).
    out_path: the PNG to write (parent directories are created).
    title: figure title.

  Returns:
    ``out_path``.

  Raises:
    FileNotFoundError: a metrics file does not exist.
  """
  fig = Figure(figsize=(11, 4))
  axes = fig.subplots(1, 2)
  for i, (label, path) in enumerate(runs.items()):
    path = pathlib.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"metrics file {path} (run {label!r}) not found")
    rows = read_metrics(path)
    color = f"C{i}"
    for ax, x in zip(axes, ("step", "train_s")):
      xs, ys = _series(rows, "train", "loss", x)
      ax.plot(xs, ys, color=color, alpha=0.35, lw=1)
      xs, ys = _series(rows, "eval", "val_loss", x)
      ax.plot(xs, ys, color=color, marker="o", ms=3, lw=2,
              label=f"{label} (val; faint: train)")
  axes[0].set_xlabel("optimizer step")
  axes[1].set_xlabel("training seconds (compilation excluded)")
  for ax in axes:
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return _save(fig, out_path)


def plot_heatmaps(grids: Mapping[str, np.ndarray], lengths, depths,
                  out_path: str | pathlib.Path, *,
                  title: str = "passkey retrieval accuracy") -> pathlib.Path:
  """One accuracy heatmap (depth x context length) per model, side by side.

  Args:
    grids: label -> float [len(depths), len(lengths)] in [0, 1].
    lengths: context lengths (columns).
    depths: needle depths (rows).
    out_path: the PNG to write.
    title: figure title.

  Returns:
    ``out_path``.
  """
  fig = Figure(figsize=(4.5 * len(grids), 3.8))
  axes = fig.subplots(1, len(grids), squeeze=False)
  for ax, (label, grid) in zip(axes[0], grids.items()):
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(t) for t in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(label)
    for (r, c), value in np.ndenumerate(grid):
      ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
              color="w" if value < 0.5 else "k")
    fig.colorbar(image, ax=ax, label="accuracy (fraction of samples)")
  fig.suptitle(title)
  return _save(fig, out_path)


def _save(fig, out_path) -> pathlib.Path:
  """Lays out and writes ``fig`` as a PNG, creating folders."""
  fig.tight_layout()
  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_path, dpi=110)
  return out_path
