"""Bad command lines of experiments/train_lm.py fail with a readable message."""

import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).parents[2] / "experiments" / "train_lm.py"


@pytest.fixture(name="train_lm", scope="module")
def fixture_train_lm():
  spec = importlib.util.spec_from_file_location("train_lm", _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules["train_lm"] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tpu-1m"], "invalid choice: 'tpu-1m'"),
    (["--steps", "0"], "TrainConfig.steps must be a positive int"),
    (["--d_model", "abc"], "argument --d_model: invalid int value: 'abc'"),
    (["--nsa_cmp_stride", "5"], "must be a multiple of cmp_stride=5"),
    (["--attention", "nsa,sparse"], "LMConfig.attention='sparse'"),
    (["--attention", "full,full"], "distinct"),
    (["--batch_size", "6", "--grad_accum", "4"], "divisible by grad_accum"),
    (["--passkey_rows", "4"], "--passkey_rows=4 must be in"),
    (["--async_checkpoints", "maybe"], "expected true/false"),
])
def test_bad_arguments(train_lm, capsys, argv, message):
  with pytest.raises(SystemExit) as info:
    train_lm.main(argv)
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert message in err
  assert "Traceback" not in err


def test_presets_resolve(train_lm):
  parser = train_lm.build_parser()
  for name in train_lm.PRESETS:
    plan = train_lm.resolve(parser.parse_args(["--preset", name]), parser)
    assert set(plan.models) == {"nsa", "full"}
    assert plan.train.seq_len >= (8192 if name.startswith("gpu") else 512)
  plan = train_lm.resolve(
      parser.parse_args(["--steps", "7", "--nsa_window", "128",
                         "--dtype", "bfloat16", "--attention", "nsa"]), parser)
  assert plan.train.steps == 7 and plan.models["nsa"].nsa.window == 128
  assert plan.models["nsa"].dtype == "bfloat16"
