"""Pictures of the keys each query sees through NSA's three branches."""

from __future__ import annotations

import os

from matplotlib.figure import Figure
from matplotlib.patches import Patch
import numpy as np

from nsa_jax import ops
from nsa_jax.config import NSAConfig

# RGB of each region of the picture. Selection and window overlap near the
# diagonal, so their overlap has its own colour; the compressed span lies
# under both and its right edge is also drawn as a line.
COLORS = {
    "compressed": (0.82, 0.82, 0.82),
    "selected": (0.12, 0.47, 0.71),
    "window": (1.00, 0.62, 0.25),
    "both": (0.55, 0.27, 0.62),
}
LABELS = {
    "selected": "keys of selected blocks",
    "window": "sliding window",
    "both": "selected and in window",
    "compressed": "raw keys under visible compressed tokens",
}


def branch_masks(block_indices, config: NSAConfig) -> dict[str, np.ndarray]:
  """Keys each query sees per branch, for one head (docs/SEMANTICS.md).

  Args:
    block_indices: int [T, n], the selected blocks of each query for one
      (batch item, kv head), entries in [0, ceil(T / l')) or -1.
    config: the NSA hyper-parameters that produced them.

  Returns:
    dict of bool numpy arrays [T, T] indexed [query t, key s]:
      "selected": s <= t and s lies in a selected block of t;
      "window": t - w < s <= t;
      "compressed": s lies in [i*d, i*d + l) of some compressed token i that
        t sees (i*d + l - 1 <= t).
  """
  block_indices = np.asarray(block_indices)
  if block_indices.ndim != 2:
    raise ValueError(f"block_indices must be [T, n], got "
                     f"{block_indices.shape=}")
  seq_len = block_indices.shape[0]
  t = np.arange(seq_len)[:, None]  # [T, 1]
  s = np.arange(seq_len)[None, :]  # [1, T]
  causal = s <= t
  key_block = s // config.sel_block  # [1, T]
  in_selected = (block_indices[:, :, None] == key_block[:, None, :]).any(1)
  compressed = np.zeros((seq_len, seq_len), bool)
  size, stride = config.cmp_block, config.cmp_stride
  for i in range(config.num_compressed(seq_len)):
    # Token i covers keys [i*d, i*d + l), seen by queries t >= i*d + l - 1.
    compressed[i * stride + size - 1:, i * stride:i * stride + size] = True
  return {
      "selected": in_selected & causal,
      "window": causal & (s > t - config.window),
      "compressed": compressed,
  }


def layer_branch_masks(layer, x, *, batch: int = 0, kv_head: int = 0,
                       positions=None):
  """Runs an NSAAttention layer's selection on ``x`` and returns its masks.

  The selection is the layer's own: its projections (``branch_inputs``),
  branch 1's log-sum-exp from ``ops.compressed_attention`` and
  ``ops.select_blocks``, all with the layer's ``impl``.

  Args:
    layer: an ``nsa_jax.modules.NSAAttention``.
    x: [B, T, d_model] input of the layer.
    batch: which batch item to show.
    kv_head: which kv head (its block set is shared by its query heads).
    positions: optional positions passed to the layer.

  Returns:
    (masks, block_indices): ``branch_masks`` of that item and head, and the
    int32 numpy [T, n] block indices they come from.
  """
  config = layer.config
  inputs = layer.branch_inputs(x, positions)
  q, k_cmp = inputs["q"], inputs["k_cmp"]
  _, lse = ops.compressed_attention(
      q, k_cmp, inputs["v_cmp"], block_size=config.cmp_block,
      stride=config.cmp_stride, impl=layer.impl)
  indices = ops.select_blocks(q, k_cmp, lse, config, impl=layer.impl)
  if not 0 <= batch < indices.shape[0]:
    raise ValueError(f"batch={batch} is not in [0, {indices.shape[0]})")
  if not 0 <= kv_head < indices.shape[2]:
    raise ValueError(f"kv_head={kv_head} is not in [0, {indices.shape[2]})")
  block_indices = np.asarray(indices[batch, :, kv_head])  # [T, n]
  return branch_masks(block_indices, config), block_indices


def _picture(masks) -> np.ndarray:
  """One colour per region, white where no branch looks: RGB [T, T, 3]."""
  seq_len = masks["window"].shape[0]
  selected, window = masks["selected"], masks["window"]
  image = np.ones((seq_len, seq_len, 3))
  image[masks["compressed"]] = COLORS["compressed"]
  image[selected & ~window] = COLORS["selected"]
  image[window & ~selected] = COLORS["window"]
  image[selected & window] = COLORS["both"]
  return image


def _compressed_edge(compressed):
  """Staircase (keys, queries) along the right edge of the compressed span.

  Query t sees, through its compressed tokens, a prefix [0, e_t) of the raw
  keys; the line runs down x = e_t - 0.5 over each row t that sees any.
  """
  rows = np.flatnonzero(compressed.any(axis=1))
  ends = np.array([np.flatnonzero(compressed[t]).max() + 1 for t in rows])
  keys = np.repeat(ends - 0.5, 2)
  queries = np.stack([rows - 0.5, rows + 0.5], axis=1).reshape(-1)
  return keys, queries


def _title(config: NSAConfig, seq_len, batch, kv_head):
  c = config
  return (f"NSA: keys seen per query (T={seq_len}, batch {batch}, "
          f"kv head {kv_head})\n"
          f"compression l={c.cmp_block}, d={c.cmp_stride}; selection "
          f"l'={c.sel_block}, n={c.num_selected} ({c.num_initial} initial, "
          f"{c.num_local} local); window w={c.window}")


def plot_selection(layer, x, *, batch: int = 0, kv_head: int = 0,
                   positions=None, path: str | None = None,
                   title: str | None = None, figsize=(7.5, 7.0),
                   dpi: int = 150) -> Figure:
  """Draws [query position x key position] for one item and kv head.

  Three layers of colour: the keys of each query's selected blocks (blue),
  its sliding window (orange; purple where it overlaps the selection), and
  under both the span of raw keys covered by the compressed tokens it sees
  (grey, its right edge drawn as a dark line). Dotted lines mark the
  selection-block boundaries.

  Args:
    layer: an ``nsa_jax.modules.NSAAttention``.
    x: [B, T, d_model] input of the layer.
    batch: batch item to show. kv_head: kv head to show.
    positions: optional positions passed to the layer.
    path: if given, the figure is saved there (PNG, PDF... by extension).
    title: replaces the default title (which states the config).
    figsize, dpi: figure size in inches and resolution of the saved file.

  Returns:
    The matplotlib ``Figure`` (not registered with pyplot).
  """
  masks, _ = layer_branch_masks(layer, x, batch=batch, kv_head=kv_head,
                                positions=positions)
  config = layer.config
  seq_len = masks["window"].shape[0]
  fig = Figure(figsize=figsize, dpi=dpi)
  ax = fig.add_subplot()
  ax.imshow(_picture(masks), interpolation="nearest",
            extent=(-0.5, seq_len - 0.5, seq_len - 0.5, -0.5))
  keys, queries = _compressed_edge(masks["compressed"])
  ax.plot(keys, queries, color="0.25", lw=0.8, gid="compressed-edge")
  for edge in range(config.sel_block, seq_len, config.sel_block):
    ax.axvline(edge - 0.5, color="k", lw=0.4, ls=":", alpha=0.5)
  ax.set_xlabel("key position")
  ax.set_ylabel("query position")
  ax.set_title(title or _title(config, seq_len, batch, kv_head), fontsize=9)
  handles = [Patch(facecolor=COLORS[name], label=LABELS[name])
             for name in ("selected", "window", "both")]
  handles.append(Patch(facecolor=COLORS["compressed"], edgecolor="0.25",
                       label=LABELS["compressed"]))
  # The upper right triangle (future keys) is empty: room for the legend.
  ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
  fig.tight_layout()
  if path is not None:
    directory = os.path.dirname(path)
    if directory:
      os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=dpi)
  return fig
