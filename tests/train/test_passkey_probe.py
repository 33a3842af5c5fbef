"""experiments/passkey_probe.py runs end to end (a few steps, CPU)."""

import experiment_scripts
import numpy as np
import pytest

PROBE = experiment_scripts.load("passkey_probe")


def test_probe_trains_evaluates_and_scores(capsys, tmp_path):
  hits = PROBE.main(["--phases", "4:128", "--batch-size", "2",
                     "--eval-every", "2", "--eval-lengths", "128",
                     "--samples", "1", "--warmup-steps", "1",
                     "--rope-base", "500000",
                     "--plot", str(tmp_path / "heat.png")])
  out = capsys.readouterr().out
  # Evaluations after steps 2 and 4 read the synced model: finite losses.
  lines = [l for l in out.splitlines() if l.startswith("step ")]
  assert [l.split()[1] for l in lines] == ["2", "4"]
  assert all("nan" not in l for l in lines)
  assert hits.shape == (5, 1, 1, 5) and hits.dtype == bool
  assert np.isin(hits, (True, False)).all()
  assert (tmp_path / "heat.png").stat().st_size > 0


def test_probe_nsa_takes_num_selected():
  hits = PROBE.main(["--attention", "nsa", "--num-selected", "5",
                     "--phases", "2:128", "--batch-size", "2",
                     "--eval-every", "2", "--eval-lengths", "128",
                     "--samples", "1", "--warmup-steps", "1"])
  assert hits.shape == (5, 1, 1, 5)


def test_probe_rejects_too_few_selected_blocks(capsys):
  # Three blocks are forced (one initial, two local): 2 leaves no room.
  with pytest.raises(SystemExit):
    PROBE.main(["--attention", "nsa", "--num-selected", "2"])
  assert "num_selected=2" in capsys.readouterr().err
