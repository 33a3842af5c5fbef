"""TrainConfig: the optimisation, logging and checkpointing settings."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters of one training run, validated.

  Attributes:
    steps: optimizer steps in the whole run.
    batch_size: sequences per optimizer step (global batch).
    grad_accum: micro-batches per step; ``batch_size`` must divide by it.
    seq_len: T, tokens per sequence.
    lr: peak learning rate.
    min_lr_ratio: final learning rate as a fraction of ``lr``.
    warmup_steps: linear warm-up from 0 to ``lr``; then cosine decay.
    weight_decay: AdamW decoupled weight decay (matrices only).
    b1: Adam beta1.
    b2: Adam beta2.
    eps: Adam epsilon.
    clip_norm: global gradient-norm clip; 0 disables.
    seed: seed of the model init, data order and training RNG.
    log_every: steps between metric rows (1 logs every step).
    eval_every: steps between validation passes; 0 evaluates only at the end.
    eval_batches: validation batches per pass.
    ckpt_every: steps between checkpoints; 0 saves only the final one.
    keep_checkpoints: newest checkpoints kept on disk.
    async_checkpoints: write checkpoints in the background (orbax async).
    progress: show a tqdm bar (only when stderr is a terminal).
  """

  steps: int = 1000
  batch_size: int = 8
  grad_accum: int = 1
  seq_len: int = 1024
  lr: float = 1e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 100
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  seed: int = 0
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 4
  ckpt_every: int = 200
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  progress: bool = True

  def __post_init__(self):
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every",
                 "eval_batches", "keep_checkpoints"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"TrainConfig.{name} must be a positive int, got {value!r}")
    for name in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"TrainConfig.{name} must be an int >= 0, got {value!r}")
    if self.batch_size % self.grad_accum:
      raise ValueError(
          f"TrainConfig.batch_size={self.batch_size} must be divisible by "
          f"grad_accum={self.grad_accum}")
    if self.warmup_steps > self.steps:
      raise ValueError(
          f"TrainConfig.warmup_steps={self.warmup_steps} exceeds "
          f"steps={self.steps}")
    if not self.lr > 0:
      raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ValueError(
          "TrainConfig.min_lr_ratio must be in [0, 1], got "
          f"{self.min_lr_ratio}")
    if self.weight_decay < 0 or self.clip_norm < 0:
      raise ValueError(
          f"TrainConfig.weight_decay={self.weight_decay} and "
          f"clip_norm={self.clip_norm} must be >= 0")
    for name in ("b1", "b2"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(
            f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")

  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // self.grad_accum

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len
