"""The train_lm.py command line: bad flags fail readably, presets resolve."""

import experiment_scripts
import pytest

from nsa_jax.train import cli
from nsa_jax.train import presets


def _main(argv):
  args, parser = cli.parse(argv)
  return cli.resolve(args, parser)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tpu-1m"], "invalid choice: 'tpu-1m'"),
    (["--steps", "0"], "TrainConfig.steps must be a positive int"),
    (["--d-model", "abc"], "argument --d-model: invalid int value: 'abc'"),
    (["--nsa-cmp-stride", "5"], "must be a multiple of cmp_stride=5"),
    (["--attention", "nsa,sparse"], "LMConfig.attention='sparse'"),
    (["--attention", "full,full"], "distinct"),
    (["--batch-size", "6", "--grad-accum", "4"], "divisible by grad_accum"),
    (["--passkey-rows", "4"], "--passkey-rows=4 must be in"),
    (["--async-checkpoints", "maybe"], "unrecognized arguments: maybe"),
    (["--seq_len", "64"], "flags are spelled with dashes (--seq-len)"),
    (["--seq", "64"], "unrecognized arguments: --seq"),
    (["--fresh", "--resume"], "not allowed with argument"),
    (["--fresh", "--resume-step", "3"], "exclude each other"),
    (["--data", "wiki"], "--data='wiki' is not one of"),
])
def test_bad_arguments(capsys, argv, message):
  with pytest.raises(SystemExit) as info:
    _main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert message in err
  assert "Traceback" not in err


def test_presets_resolve():
  for name in presets.PRESETS:
    plan = _main(["--preset", name])
    assert set(plan.models) == {"nsa", "full"}
    assert plan.train.seq_len >= (8192 if name.startswith("gpu") else 512)
  plan = _main(["--steps", "7", "--nsa-window", "128", "--dtype", "bfloat16",
                "--attention", "nsa", "--no-progress", "--resume-step", "4"])
  assert plan.train.steps == 7 and plan.models["nsa"].nsa.window == 128
  assert plan.models["nsa"].dtype == "bfloat16"
  assert not plan.train.progress and plan.train.async_checkpoints
  assert plan.mode == "resume" and plan.resume_step == 4


def test_help_shows_the_values_of_the_named_preset(capsys, monkeypatch):
  # The script's main in this process (a subprocess each would pay a jax
  # import); argparse wraps help at $COLUMNS, as in an 80-column terminal.
  monkeypatch.setenv("COLUMNS", "80")
  script = experiment_scripts.load("train_lm")
  for preset, line in [
      ("cpu-demo", "LMConfig.d_model (default: 128, preset cpu-demo)"),
      ("gpu-8k", "LMConfig.d_model (default: 512, preset gpu-8k)"),
      ("gpu-32k", "TrainConfig.seq_len (default: 32768, preset gpu-32k)")]:
    with pytest.raises(SystemExit) as info:
      script.main(["--preset", preset, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert line in " ".join(out.split()), out
  assert "--no-progress" in out and "--no_progress" not in out
  assert "(default: 256, built-in)" in " ".join(out.split())
