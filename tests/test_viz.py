"""nsa_jax.viz: branch masks follow the spec; the plot renders and saves."""

import matplotlib

matplotlib.use("Agg")

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig
from nsa_jax import viz
from nsa_jax.modules import NSAAttention
from nsa_jax.reference import selected_block_mask

# Ts = 6 blocks for T = 45 and n = 4 slots (1 initial, 1 local): 2 free.
CONFIG = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, num_selected=4,
                   num_initial=1, num_local=1, window=6)
SEQ_LEN = 45


@pytest.fixture(scope="module", name="layer")
def fixture_layer():
  return NSAAttention(16, 4, 2, 8, config=CONFIG, impl="xla",
                      rngs=nnx.Rngs(0))


@pytest.fixture(scope="module", name="x")
def fixture_x():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.standard_normal((2, SEQ_LEN, 16)), jnp.float32)


def test_window_and_compressed_masks_follow_the_spec():
  indices = np.full((SEQ_LEN, CONFIG.num_selected), -1, np.int32)
  masks = viz.branch_masks(indices, CONFIG)
  for t in range(SEQ_LEN):
    for s in range(SEQ_LEN):
      assert masks["window"][t, s] == (t - CONFIG.window < s <= t)
      covered = any(
          i * 4 + 8 - 1 <= t and i * 4 <= s < i * 4 + 8
          for i in range(CONFIG.num_compressed(SEQ_LEN)))
      assert masks["compressed"][t, s] == covered
  assert not masks["selected"].any()  # all slots empty
  # No compressed token before t = l - 1; then [0, 8) up to t = 11, ...
  assert not masks["compressed"][:7].any()
  np.testing.assert_array_equal(np.flatnonzero(masks["compressed"][7]),
                                np.arange(8))
  np.testing.assert_array_equal(np.flatnonzero(masks["compressed"][12]),
                                np.arange(12))


def test_selected_mask_of_hand_made_indices():
  config = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, num_selected=2,
                     num_initial=0, num_local=1, window=1)
  indices = np.array([[0, -1]] * 4 + [[1, 0]] * 4 + [[2, 0]] * 2)  # T = 10
  masks = viz.branch_masks(indices, config)
  assert masks["selected"][3].tolist() == [1] * 4 + [0] * 6
  assert masks["selected"][5].tolist() == [1] * 6 + [0] * 4
  assert masks["selected"][9].tolist() == [1] * 4 + [0] * 4 + [1] * 2
  np.testing.assert_array_equal(masks["window"], np.eye(10, dtype=bool))


def test_layer_masks_contain_forced_blocks_and_match_reference(layer, x):
  for batch, kv_head in [(0, 0), (1, 1)]:
    masks, indices = viz.layer_branch_masks(layer, x, batch=batch,
                                            kv_head=kv_head)
    assert indices.shape == (SEQ_LEN, CONFIG.num_selected)
    for name in ("selected", "window", "compressed"):
      assert masks[name].shape == (SEQ_LEN, SEQ_LEN)
      assert masks[name].dtype == bool
    want = np.asarray(selected_block_mask(jnp.asarray(indices)[None, :, None],
                                          SEQ_LEN, CONFIG.sel_block))
    np.testing.assert_array_equal(masks["selected"], want[0, :, 0])
    selected = masks["selected"]
    assert not np.triu(selected, k=1).any()  # causal
    for t in range(SEQ_LEN):
      own = t // 8
      # Forced: block 0 (initial) and the query's own block (local).
      assert selected[t, :min(t, 7) + 1].all()
      assert selected[t, own * 8:t + 1].all()
      # min(n, own + 1) distinct blocks, each either whole or cut at t.
      blocks = {s // 8 for s in np.flatnonzero(selected[t])}
      assert len(blocks) == min(CONFIG.num_selected, own + 1)
  # The two free slots really choose: some query skips some past block.
  masks, _ = viz.layer_branch_masks(layer, x)
  assert (~masks["selected"] & np.tri(SEQ_LEN, dtype=bool)).any()
  with pytest.raises(ValueError, match="kv_head"):
    viz.layer_branch_masks(layer, x, kv_head=2)


def test_plot_selection_saves_a_png(layer, x, tmp_path):
  path = tmp_path / "plots" / "selection.png"
  fig = viz.plot_selection(layer, x, batch=1, kv_head=1, path=str(path))
  ax = fig.axes[0]
  assert ax.get_xlabel() == "key position"
  assert ax.get_ylabel() == "query position"
  assert "l'=8" in ax.get_title() and "w=6" in ax.get_title()
  legend = [text.get_text() for text in ax.get_legend().get_texts()]
  assert legend == [viz.LABELS[k] for k in ("selected", "window", "both",
                                            "compressed")]
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  image = ax.get_images()[0].get_array()
  assert image.shape == (SEQ_LEN, SEQ_LEN, 3)
  masks, _ = viz.layer_branch_masks(layer, x, batch=1, kv_head=1)
  future = ~np.tri(SEQ_LEN, dtype=bool)
  np.testing.assert_array_equal(image[future], np.ones((future.sum(), 3)))
  only_selected = masks["selected"] & ~masks["window"]
  assert only_selected.any()
  blue = np.asarray(viz.COLORS["selected"])
  np.testing.assert_array_equal(
      image[only_selected], np.broadcast_to(blue, (only_selected.sum(), 3)))
  np.testing.assert_array_equal(image[SEQ_LEN - 1, SEQ_LEN - 1],
                                np.asarray(viz.COLORS["both"]))
  # The compressed span's right edge: query 44 sees tokens i <= 9, so keys
  # [0, 9 * 4 + 8) = [0, 44); the line runs down x = 43.5 on that row.
  (line,) = [ln for ln in ax.get_lines()
             if ln.get_gid() == "compressed-edge"]
  keys, queries = line.get_xdata(), line.get_ydata()
  assert keys[-1] == 43.5 and queries[-1] == SEQ_LEN - 0.5
  assert queries[0] == CONFIG.cmp_block - 1.5 and keys[0] == 7.5
