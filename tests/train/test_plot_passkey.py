"""experiments/plot_passkey.py: grids read back from probe logs, plotted."""

import experiment_scripts
import numpy as np
import pytest

SCRIPT = experiment_scripts.load("plot_passkey")


def _log(path, cells):
  lines = ["step 4 T 128: train loss 1.000 (1 s)"]
  lines += [f"T {t} depth {d:.2f}: accuracy {a:.2f}, each digit 1.00"
            for (t, d), a in cells.items()]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


CELLS = {(128, 0.0): 1.0, (128, 0.5): 0.5, (256, 0.0): 0.25,
         (256, 0.5): 0.0}


def test_grid_is_depth_by_length(tmp_path):
  lengths, depths, grid = SCRIPT.read_grid(_log(tmp_path / "a.txt", CELLS))
  assert lengths == [128, 256] and depths == [0.0, 0.5]
  np.testing.assert_array_equal(grid, [[1.0, 0.25], [0.5, 0.0]])


def test_two_logs_make_one_figure(tmp_path, capsys):
  a, b = _log(tmp_path / "a.txt", CELLS), _log(tmp_path / "b.txt", CELLS)
  out = SCRIPT.main([a, b, "--label", "NSA, base 1e4", "--label", "full",
                     "--out", str(tmp_path / "p.png")])
  assert out.stat().st_size > 0 and "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("case,message", [
    ("empty", "no 'T <length> depth"), ("hole", "no accuracy for"),
    ("labels", "distinct names"), ("mismatch", "covers lengths")])
def test_bad_input_is_a_usage_error(tmp_path, capsys, case, message):
  good = _log(tmp_path / "good.txt", CELLS)
  other = {"empty": {}, "hole": dict(list(CELLS.items())[:3]),
           "labels": CELLS, "mismatch": {(128, 0.0): 1.0}}[case]
  bad = _log(tmp_path / "bad.txt", other)
  labels = ["--label", "x", "--label", "x"] if case == "labels" else []
  with pytest.raises(SystemExit):
    SCRIPT.main([good, bad, *labels, "--out", str(tmp_path / "p.png")])
  assert message in capsys.readouterr().err
