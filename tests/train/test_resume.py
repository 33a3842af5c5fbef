"""A run killed with SIGKILL and resumed logs the losses of an unbroken run."""

import os
import pathlib
import signal
import subprocess
import sys
import time

from nsa_jax import train
from nsa_jax.train import checkpoint

_SCRIPT = pathlib.Path(__file__).parents[2] / "experiments" / "train_lm.py"
_TINY = [
    "--attention", "full", "--steps", "10", "--batch-size", "2",
    "--seq-len", "32", "--d-model", "32", "--num-layers", "1",
    "--num-heads", "2", "--num-kv-heads", "1", "--head-dim", "16",
    "--mlp-hidden", "64", "--max-corpus-bytes", "300000",
    "--ckpt-every", "3", "--log-every", "1", "--eval-every", "0",
    "--warmup-steps", "2", "--no-progress", "--no-plot",
]


def _start(workdir, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen(
      [sys.executable, str(_SCRIPT), *_TINY, "--workdir", str(workdir),
       *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def _losses(workdir):
  rows = train.read_metrics(workdir / "full" / "metrics.jsonl")
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_sigkill_and_resume_reproduce_losses(tmp_path):
  reference = _start(tmp_path / "ref")
  victim = _start(tmp_path / "run", "--debug-step-delay", "0.4")
  ckpt_dir = tmp_path / "run" / "full" / "checkpoints"
  deadline = time.time() + 240
  while not any(s >= 3 for s in checkpoint.scan(ckpt_dir)[0]):
    assert victim.poll() is None, victim.communicate()[0]
    assert time.time() < deadline, "no checkpoint was written in time"
    time.sleep(0.1)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert victim.returncode == -signal.SIGKILL
  assert 10 not in _losses(tmp_path / "run")  # it really died mid-run

  out, _ = reference.communicate(timeout=240)
  assert reference.returncode == 0, out
  resumed = _start(tmp_path / "run", "--resume")
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, out
  assert "resumed from" in out

  expected = _losses(tmp_path / "ref")
  assert sorted(expected) == list(range(1, 11))
  assert _losses(tmp_path / "run") == expected  # bit-identical, every step
