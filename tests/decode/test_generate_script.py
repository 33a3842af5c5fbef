"""experiments/generate.py continues a prompt from a train_lm.py checkpoint."""

import experiment_scripts
import numpy as np
import pytest

from nsa_jax.train import cli
from nsa_jax.train import runs

_TINY_RUN = [
    "--attention", "nsa", "--steps", "2", "--batch-size", "2",
    "--seq-len", "32", "--d-model", "32", "--num-layers", "1",
    "--num-heads", "2", "--num-kv-heads", "1", "--head-dim", "16",
    "--mlp-hidden", "64", "--max-corpus-bytes", "100000", "--ckpt-every",
    "2", "--log-every", "1", "--eval-every", "2", "--eval-batches", "1",
    "--warmup-steps", "1", "--no-progress", "--no-plot", "--nsa-cmp-block",
    "8", "--nsa-cmp-stride", "4", "--nsa-sel-block", "16",
    "--nsa-num-selected", "4", "--nsa-window", "16",
]


def test_generates_from_a_trained_run_and_reports_speed(tmp_path, capsys):
  args, parser = cli.parse([*_TINY_RUN, "--workdir", str(tmp_path)])
  runs.run_plan(cli.resolve(args, parser), log=lambda _: None)
  main = experiment_scripts.load("generate").main
  out = main(["--workdir", str(tmp_path), "--prompt", "import os\n",
              "--max-new-tokens", "40", "--batch", "2"])
  printed = capsys.readouterr().out
  assert "tokens/s" in printed and "import os" in printed
  tokens = out["nsa"]["tokens"]
  assert tokens.shape == (2, 40)
  np.testing.assert_array_equal(tokens[0], tokens[1])  # greedy, same prompt
  assert out["nsa"]["tokens_per_s"] > 0
  with pytest.raises(SystemExit):
    main(["--workdir", str(tmp_path / "missing")])
