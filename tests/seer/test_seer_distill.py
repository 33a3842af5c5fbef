"""Self-distillation: the KL falls, only the gates change and are saved."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from seer_testing import make_lm
from seer_testing import VOCAB

from nsa_jax import data
from nsa_jax.seer import distill
from nsa_jax.seer.gate import SeerGates
from nsa_jax.seer.model import GATE_PARAMS
from nsa_jax.seer.model import SeerLM
from nsa_jax.train import metrics
from nsa_jax.train.config import TrainConfig

CFG = TrainConfig(steps=12, batch_size=2, seq_len=48, lr=2e-2,
                  warmup_steps=2, log_every=1, eval_every=0, ckpt_every=0,
                  async_checkpoints=False, progress=False)
# One model for the file.
LM = make_lm(num_layers=1)


def _data(seed=0):
  stream = np.random.default_rng(seed).integers(0, VOCAB, 5000)
  return data.PackedIterator(stream, CFG.batch_size, CFG.seq_len, seed=seed)


def _size(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def test_training_lowers_the_kl_and_changes_only_the_gates(tmp_path):
  lm = LM
  model_before = jax.tree.map(np.asarray, nnx.state(lm.model))
  result = distill.distill(lm, CFG, _data(), tmp_path, loss_start=0.25,
                           log=lambda _: None)
  assert result.final_step == CFG.steps
  rows = metrics.read_metrics(result.metrics_path)
  kl = [r["kl"] for r in rows if r["kind"] == "train"]  # before each step
  assert len(kl) == CFG.steps and kl[-1] < 0.7 * kl[0], kl
  unchanged = jax.tree.map(lambda a, b: bool((a == np.asarray(b)).all()),
                           model_before, nnx.state(lm.model))
  assert all(jax.tree.leaves(unchanged))
  # Other gates over the same model read the trained ones back from disk:
  # the checkpoint holds the gates and their optimizer, nothing of the model.
  fresh = SeerLM(lm.model, SeerGates(lm.model.config, lm.gates.config,
                                     rngs=nnx.Rngs(5)))
  again = distill.distill(fresh, CFG, _data(), tmp_path, log=lambda _: None)
  assert again.start_step == CFG.steps
  same = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                      nnx.state(lm.gates), nnx.state(fresh.gates))
  assert all(jax.tree.leaves(same))
  optimizer = nnx.Optimizer(lm, distill.optim.make_optimizer(CFG),
                            wrt=GATE_PARAMS)
  gate_params = _size(nnx.state(lm.gates, nnx.Param))
  # Adam's mu and nu of every gate parameter and three counters: nothing
  # for the model's (many more) parameters.
  assert _size(nnx.state(optimizer)) == 2 * gate_params + 3
  assert _size(nnx.state(lm.model, nnx.Param)) > 10 * gate_params


def test_kl_is_zero_when_the_gate_matches_the_target():
  target = jnp.array([[[[0.0, 0.0]], [[0.0, 0.0]], [[0.25, 0.75]]]])
  log_probs = jnp.where(target > 0, jnp.log(jnp.where(target > 0, target, 1)),
                        -jnp.inf)  # [B=1, T=3, Hkv=1, N=2]
  kl, scored = distill.kl_rows(target, log_probs, block_size=1,
                               loss_start=0.5)
  np.testing.assert_allclose(kl, 0.0, atol=1e-7)
  assert np.asarray(scored).tolist() == [False, False, True]
  worse = distill.kl_rows(target, jnp.log(jnp.full_like(target, 0.5)), 1, 0.5)
  np.testing.assert_allclose(worse[0][0, 2, 0],
                             0.25 * np.log(0.5) + 0.75 * np.log(1.5),
                             rtol=1e-6)


def test_bad_settings_raise():
  lm = LM
  with pytest.raises(ValueError, match="loss_start"):
    distill.distill(lm, CFG, _data(), "/nonexistent", loss_start=1.0)
  with pytest.raises(ValueError, match="batches"):
    distill.distill(lm, CFG, data.PackedIterator(np.zeros(500, int), 1, 48),
                    "/nonexistent")
