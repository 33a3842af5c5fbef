"""Rerunning, resuming and refusing runs of train_lm.py leave good state."""

import pathlib
import shutil
import subprocess
import sys

import pytest

from nsa_jax.train import cli
from nsa_jax.train import runs

_ROOT = pathlib.Path(__file__).parents[2]
_TINY = [
    "--attention", "full", "--steps", "4", "--batch-size", "2",
    "--seq-len", "32", "--d-model", "32", "--num-layers", "1",
    "--num-heads", "2", "--num-kv-heads", "1", "--head-dim", "16",
    "--mlp-hidden", "64", "--max-corpus-bytes", "100000", "--ckpt-every",
    "2", "--log-every", "1", "--eval-every", "2", "--eval-batches", "1",
    "--warmup-steps", "1", "--no-progress", "--no-plot",
]


def _run(workdir, *extra):
  """Runs the plan of ``_TINY + extra`` in-process; returns (results, log)."""
  args, parser = cli.parse([*_TINY, "--workdir", str(workdir), *extra])
  lines = []
  results = runs.run_plan(cli.resolve(args, parser), log=lines.append)
  return results, "\n".join(lines)


@pytest.fixture(name="finished", scope="module")
def fixture_finished(tmp_path_factory):
  """(workdir, results) of one finished tiny run, trained once per module."""
  workdir = tmp_path_factory.mktemp("finished")
  return workdir, _run(workdir)[0]


def _copy(finished, tmp_path):
  """A private copy of the finished run and its results."""
  shutil.copytree(finished[0], tmp_path, dirs_exist_ok=True)
  return finished[1]


def _script(workdir, *extra):
  return subprocess.run(
      [sys.executable, str(_ROOT / "experiments" / "train_lm.py"), *_TINY,
       "--workdir", str(workdir), *extra], capture_output=True, text=True,
      env={"PYTHONPATH": str(_ROOT), "JAX_PLATFORMS": "cpu"}, timeout=300)


def test_rerun_reports_a_finished_run_and_fresh_retrains(tmp_path, finished):
  first = _copy(finished, tmp_path)
  assert first["full"]["steps"] == 4 and first["full"]["loss"] is not None
  again, log = _run(tmp_path)
  assert "at step 4 is finished; nothing to train" in log
  assert again["full"]["loss"] == first["full"]["loss"]
  assert again["full"]["val_loss"] == first["full"]["val_loss"]
  assert "| full |" in (tmp_path / "summary.md").read_text()
  params = first["full"]["params"]
  assert f"[full] {params:,} parameters" in log
  summary = (tmp_path / "summary.md").read_text()
  assert f"| {params:,} |" in summary and "peak memory" in summary
  resumed, _ = _run(tmp_path, "--resume")  # crashed in summarize before
  assert resumed["full"]["loss"] == first["full"]["loss"]
  fresh, log = _run(tmp_path, "--fresh")
  assert "discarded the earlier run" in log and "resumed" not in log
  assert fresh["full"]["loss"] == first["full"]["loss"]  # same seed


def test_steps_below_the_checkpoint_report_the_checkpoint(tmp_path, finished):
  _copy(finished, tmp_path)
  results, log = _run(tmp_path, "--resume", "--steps", "2")
  assert "at step 4 is past the requested 2 steps" in log
  assert results["full"]["steps"] == 4
  assert "| 4 |" in runs.summarize(results)


def test_resume_step_continues_from_the_chosen_checkpoint(tmp_path,
                                                          finished):
  first = _copy(finished, tmp_path)
  results, log = _run(tmp_path, "--resume-step", "2")
  assert "resumed from" in log and "at step 2" in log
  assert results["full"]["loss"] == first["full"]["loss"]  # exact replay


def test_a_refused_run_writes_nothing(tmp_path, finished):
  _copy(finished, tmp_path)
  run_config = tmp_path / "full" / "run_config.json"
  before = run_config.read_bytes()
  for extra in (["--d-model", "64"], ["--d-model", "64", "--resume"],
                ["--seed", "3", "--resume-step", "2"]):
    with pytest.raises(runs.RunRefused, match="differing: model|seed"):
      _run(tmp_path, *extra)
    assert run_config.read_bytes() == before
  model = runs.load_run(tmp_path / "full", log=lambda _: None)
  assert model.config.d_model == 32  # needle.py still loads the good run


def test_corrupt_latest_checkpoint_falls_back_when_resuming(tmp_path,
                                                            finished):
  first = _copy(finished, tmp_path)
  ckpts = tmp_path / "full" / "checkpoints"
  for path in (ckpts / "4" / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  results, log = _run(tmp_path, "--resume")
  assert "is corrupt" in log and "falling back to step 2" in log
  assert results["full"]["loss"] == first["full"]["loss"]


def test_resume_into_an_empty_workdir_is_one_clean_line(tmp_path):
  out = _script(tmp_path / "new", "--resume")
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == [
      f"error: cannot resume: checkpoint directory "
      f"{tmp_path / 'new' / 'full' / 'checkpoints'} does not exist"]
  assert not (tmp_path / "new").exists()


def test_remat_is_not_part_of_a_runs_identity(tmp_path, finished):
  """Resuming with remat switched on is the same run, recorded as such."""
  first = _copy(finished, tmp_path)
  results, log = _run(tmp_path, "--resume-step", "2", "--remat", "block")
  assert "resumed from" in log
  assert abs(results["full"]["loss"] - first["full"]["loss"]) < 1e-5
  saved = runs.load_model_config(tmp_path / "full")
  assert saved.remat == "block" and saved.d_model == 32
  with pytest.raises(runs.RunRefused, match="differing: model"):
    _run(tmp_path, "--resume", "--gate", "mlp", "--attention", "full",
         "--mlp-hidden", "96")
