"""AdamW with linear warm-up, cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import optax

from nsa_jax.train.config import TrainConfig


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Learning rate: 0 -> ``lr`` over ``warmup_steps``, cosine to the end."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=cfg.lr,
      warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
      end_value=cfg.lr * cfg.min_lr_ratio,
  )


def _decay_mask(params):
  """Weight decay on matrices only, not on biases, norms or scalars."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Clip by global norm (if ``clip_norm > 0``), then AdamW on the schedule."""
  adamw = optax.adamw(
      make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
      weight_decay=cfg.weight_decay, mask=_decay_mask)
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
  return adamw
