"""The GPU presets: long context, short runs, one run directory."""

import pytest

from nsa_jax.modules.transformer import count_params
from nsa_jax.train import cli
from nsa_jax.train import presets

GPU = [name for name in presets.PRESETS if name.startswith("gpu")]
# The rates the budget in presets.py assumes, tokens/s on one H100.
NSA_RATE, FULL_RATE = 200_000, 200_000


def _plan(*argv):
  args, parser = cli.parse(list(argv))
  return cli.resolve(args, parser)


def test_gpu_presets_cover_8k_to_64k():
  lengths = sorted(_plan("--preset", n).train.seq_len for n in GPU)
  assert lengths == [8192, 16384, 32768, 65536]


@pytest.mark.parametrize("name", GPU)
def test_gpu_preset_fits_the_time_budget(name):
  """NSA and full together train in <= 8 minutes at the assumed rates,
  with a minute per model for compilation, evals and checkpoints."""
  plan = _plan("--preset", name)
  cfg = plan.train
  assert cfg.tokens_per_step == presets.GPU_TOKENS_PER_STEP
  tokens = cfg.steps * cfg.tokens_per_step
  seconds = tokens / NSA_RATE + tokens / FULL_RATE + 2 * 60
  assert seconds <= 8 * 60, (name, seconds)
  assert 0 <= plan.data["passkey_rows"] < cfg.batch_size
  for model in plan.models.values():
    assert model.dtype == "bfloat16"  # cuDNN serves the full model
    assert model.head_dim % 8 == 0 and model.head_dim <= 128


def test_gpu_64k_rematerialises_blocks():
  plan = _plan("--preset", "gpu-64k")
  assert {m.remat for m in plan.models.values()} == {"block"}
  assert _plan("--preset", "gpu-64k", "--remat", "none").models[
      "nsa"].remat == "none"


def test_new_model_flags_reach_both_configs():
  plan = _plan("--preset", "gpu-8k", "--gate", "mlp", "--gate-hidden", "64",
               "--remat", "dots", "--shared-kv")
  nsa = plan.models["nsa"]
  assert (nsa.gate, nsa.gate_hidden, nsa.remat, nsa.shared_kv) == (
      "mlp", 64, "dots", True)
  assert plan.models["full"].remat == "dots"


def test_one_flag_names_the_run_directory(tmp_path):
  plan = _plan("--preset", "gpu-16k", "--workdir", str(tmp_path / "x"))
  assert plan.workdir == tmp_path / "x"
  assert _plan("--preset", "gpu-16k").workdir.as_posix() == "runs/gpu-16k"


def test_match_params_widens_only_the_full_model():
  base = _plan("--preset", "gpu-8k")
  plan = _plan("--preset", "gpu-8k", "--match-params")
  nsa = count_params(plan.models["nsa"])
  full = count_params(plan.models["full"])
  assert plan.models["nsa"] == base.models["nsa"]
  assert plan.models["full"].mlp_hidden > base.models["full"].mlp_hidden
  assert abs(full - nsa) / nsa < 0.01
  alone = _plan("--preset", "gpu-8k", "--match-params", "--attention", "full")
  assert alone.models["full"] == plan.models["full"]
