"""Tables and the plot of a ``seer_adapt`` run's results.

``results`` is what ``nsa_jax.seer.adapt.run`` writes to
``seer_results.json``: ``dense`` (perplexity, passkey, decode_ms),
``budgets`` (one row per token budget: fraction, budget, blocks,
perplexity, quality = dense perplexity / perplexity, passkey, recall,
decode_ms) and, with speed measured, ``attention`` (per head shape: dense
and sparse ms of one layer's decode attention).
"""

from __future__ import annotations

import pathlib
from typing import Any

from matplotlib.figure import Figure


def best_dense(times: dict[str, Any]) -> tuple[str | None, float | None]:
  """(name, ms) of the fastest dense method that ran; (None, None) if none.
  """
  timed = {k: v for k, v in times.items() if isinstance(v, float)}
  if not timed:
    return None, None
  name = min(timed, key=timed.get)
  return name, timed[name]


def _ms(value) -> str:
  return f"{value:.3f}" if isinstance(value, float) else str(value)


def _budget_name(row) -> str:
  return f"1/{round(1 / row['fraction'])} ({row['budget']})"


def _table(head, rows) -> list[str]:
  return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
          + ["| " + " | ".join(cells) + " |" for cells in rows])


def quality_table(results: dict[str, Any]) -> str:
  """Markdown: quality and whole-model decode time, dense then per budget."""
  dense = results["dense"]
  speed = "decode_ms" in dense
  head = ["budget (tokens)", "blocks read", "perplexity", "dense ppl / ppl",
          "passkey", "gate recall"]
  cells = [["dense", "all", f"{dense['perplexity']:.4f}", "1.000",
            f"{dense['passkey']:.2f}", "-"]]
  if speed:
    head += ["model decode ms", "speed-up"]
    cells[0] += [_ms(dense["decode_ms"]), "1.0x"]
  for row in results["budgets"]:
    recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
    line = [_budget_name(row), str(row["blocks"]),
            f"{row['perplexity']:.4f}", f"{row['quality']:.3f}",
            f"{row['passkey']:.2f}", recall]
    if speed:
      line += [_ms(row["decode_ms"]),
               f"{dense['decode_ms'] / row['decode_ms']:.1f}x"]
    cells.append(line)
  return "\n".join(_table(head, cells))


def attention_table(results: dict[str, Any]) -> str:
  """Markdown: one layer's decode attention, gated against the best dense."""
  head = ["heads (Hq / Hkv / D)", "context x batch", "budget (tokens)",
          "gated ms", "best dense ms", "speed-up"]
  cells = []
  for entry in results["attention"]:
    name, dense_ms = best_dense(entry["dense"])
    heads = " / ".join(str(h) for h in entry["heads"])
    for row in results["budgets"]:
      ms = entry["sparse"][str(row["budget"])]
      ratio = (f"{dense_ms / ms:.1f}x" if dense_ms and isinstance(ms, float)
               else "-")
      cells.append([heads, f"{entry['context']} x {entry['batch']}",
                    _budget_name(row), _ms(ms),
                    f"{dense_ms:.3f} ({name})" if dense_ms else "-", ratio])
  return "\n".join(_table(head, cells))


def summary_tables(results: dict[str, Any]) -> str:
  """Both tables (the attention one only when speed was measured)."""
  parts = [quality_table(results)]
  if results.get("attention"):
    parts.append(attention_table(results))
  return "\n\n".join(parts)


def plot_budgets(results: dict[str, Any], path: str | pathlib.Path,
                 title: str = "") -> pathlib.Path:
  """Quality (left) and decode speed-up (right) against the token budget.

  Returns:
    ``path`` (parent directories are created).
  """
  rows, dense = results["budgets"], results["dense"]
  x = [r["fraction"] for r in rows]
  speed = "decode_ms" in dense
  fig = Figure(figsize=(11 if speed else 6, 4))
  axes = fig.subplots(1, 2 if speed else 1, squeeze=False)[0]
  ax = axes[0]
  ax.plot(x, [r["quality"] for r in rows], "o-", label="dense ppl / ppl")
  ax.plot(x, [r["passkey"] for r in rows], "s-", label="passkey accuracy")
  ax.axhline(dense["passkey"], color="C1", ls=":", label="dense passkey")
  ax.plot(x, [float("nan") if r["recall"] is None else r["recall"]
              for r in rows], "^-", label="gate recall of oracle blocks")
  ax.axhline(1.0, color="gray", ls="--", lw=0.8)
  ax.set(xscale="log", xlabel="token budget / context", ylim=(0, 1.05),
         title="quality against dense")
  ax.legend(fontsize=8, loc="lower right")
  if speed:
    ax = axes[1]
    ax.plot(x, [dense["decode_ms"] / r["decode_ms"] for r in rows], "o-",
            label="whole model decode step")
    for entry in results.get("attention", []):
      _, dense_ms = best_dense(entry["dense"])
      times = [entry["sparse"][str(r["budget"])] for r in rows]
      if dense_ms:
        ax.plot(x, [dense_ms / t if isinstance(t, float) else float("nan")
                    for t in times], "s-",
                label="attention, heads " + "/".join(
                    str(h) for h in entry["heads"]))
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set(xscale="log", xlabel="token budget / context",
           ylabel="speed-up over dense", title="decode speed")
    ax.legend(fontsize=8)
  for ax in axes:
    ax.set_xticks(x, [f"1/{round(1 / f)}" for f in x])
    ax.minorticks_off()
  fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  return path
