"""Tests of TrainConfig validation and the learning-rate schedule."""

import numpy as np
import pytest

from nsa_jax import train


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "steps"),
    ({"batch_size": 6, "grad_accum": 4}, "divisible"),
    ({"warmup_steps": 20, "steps": 10}, "warmup_steps"),
    ({"lr": 0.0}, "lr"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
    ({"b2": 1.0}, "b2"),
    ({"log_every": True}, "log_every"),
])
def test_bad_config_is_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    train.TrainConfig(**kwargs)


def test_schedule_warms_up_then_decays():
  cfg = train.TrainConfig(steps=100, warmup_steps=10, lr=1e-3,
                          min_lr_ratio=0.1)
  lr = train.make_schedule(cfg)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 1e-4, rtol=1e-5)
  assert float(lr(50)) < float(lr(20))
  assert cfg.micro_batch_size == 8 and cfg.tokens_per_step == 8 * 1024
