"""Self-distillation of the gates against the frozen model's own attention.

For every layer the frozen model's attention runs through
``oracle.attention_oracle`` (which also gives the layer's output, so the
model runs once), the gate scores the same queries, and the loss is
``KL(target || gate)`` per query, averaged over the queries of the later
part of each sequence (positions ``t >= loss_start * T`` that have at least
one block before their own), the kv heads and the layers. Only the gates'
parameters (``model.GATE_PARAMS``) are differentiated and updated; the
checkpoints hold the gates and their optimizer alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import math
import pathlib
import sys
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax
import tqdm

from nsa_jax.data.iterators import Batch
from nsa_jax.data.iterators import StepIterator
from nsa_jax.decode import layers as layers_lib
from nsa_jax.modules.rope import apply_rope
from nsa_jax.seer.model import GATE_PARAMS
from nsa_jax.seer.model import SeerLM
from nsa_jax.seer.oracle import attention_oracle
from nsa_jax.train import checkpoint as checkpoint_lib
from nsa_jax.train import metrics as metrics_lib
from nsa_jax.train import optim
from nsa_jax.train import steps as steps_lib
from nsa_jax.train.config import TrainConfig


def layer_targets(lm: SeerLM, tokens, *, impl: str = "auto"):
  """Per layer, the oracle's block target and the gate's log-probabilities.

  Args:
    lm: the SeerLM (its model runs dense, through the oracle).
    tokens: int [B, T].
    impl: of ``attention_oracle``.

  Returns:
    A tuple, one ``(target, log_probs)`` per layer: target float32
    [B, T, Hkv, ceil(T / b)], log_probs float32 [B, T, Hkv, T // b].
  """
  b = lm.block_size
  positions = jnp.arange(tokens.shape[1])

  def attend(index, attn, x, state):
    del state
    q, k, v = layers_lib.full_qkv(attn, x)
    out, target = attention_oracle(
        apply_rope(q, positions, attn.rope_base),
        apply_rope(k, positions, attn.rope_base), v, block_size=b, impl=impl)
    log_probs = lm.gates.layers[index](jax.lax.stop_gradient(q),
                                       jax.lax.stop_gradient(k))
    return (attn.out_proj(out.reshape(*x.shape[:2], -1)),
            (target, log_probs))

  return layers_lib.run_layers(lm.model, tokens,
                               (None,) * len(lm.model.layers), attend)[1]


def kl_rows(target, log_probs, block_size: int, loss_start: float):
  """KL(target || gate) of each scored query, and which queries are scored.

  Args:
    target: float32 [B, T, Hkv, N'] (N' >= N), the oracle's distribution.
    log_probs: float32 [B, T, Hkv, N] the gate's, -inf where not visible.
    block_size: b.
    loss_start: queries at ``t >= loss_start * T`` are scored (and only
      those with a block before their own, ``t >= b``).

  Returns:
    (kl float32 [B, T, Hkv], scored bool [T]).
  """
  t = target.shape[1]
  n = log_probs.shape[-1]
  target = target[..., :n]
  log_q = jnp.where(jnp.isfinite(log_probs), log_probs, 0.0)
  safe = jnp.where(target > 0, target, 1.0)
  kl = jnp.sum(jnp.where(target > 0, target * (jnp.log(safe) - log_q), 0.0),
               axis=-1)
  pos = jnp.arange(t)
  return kl, (pos >= math.ceil(loss_start * t)) & (pos >= block_size)


def distill_loss(lm: SeerLM, tokens, *, loss_start: float,
                 impl: str = "auto"):
  """Mean KL(target || gate) over scored queries, kv heads and layers.

  Args:
    lm: the SeerLM.
    tokens: int [B, T].
    loss_start: see ``kl_rows``.
    impl: of the oracle.

  Returns:
    float32 scalar (0 when no query is scored).
  """
  total = 0.0
  for target, log_probs in layer_targets(lm, tokens, impl=impl):
    kl, scored = kl_rows(target, log_probs, lm.block_size, loss_start)
    weight = jnp.broadcast_to(scored[None, :, None], kl.shape)
    total += jnp.sum(kl * weight) / jnp.maximum(jnp.sum(weight), 1)
  return total / len(lm.model.layers)


def distill_step_fn(lm: SeerLM, optimizer: nnx.Optimizer, tokens, *,
                    loss_start: float, impl: str = "auto"):
  """One optimizer step of the gates (uncompiled: ``distill`` runs it
  through ``steps.SplitTrainStep``).

  Args:
    lm: the SeerLM; only its ``GATE_PARAMS`` change.
    optimizer: ``nnx.Optimizer(lm, tx, wrt=GATE_PARAMS)``.
    tokens: int [B, T].
    loss_start: see ``kl_rows``. impl: of the oracle.

  Returns:
    ``kl`` (the loss before the step) and ``grad_norm``.
  """
  loss_fn = lambda m: distill_loss(m, tokens, loss_start=loss_start,
                                   impl=impl)
  kl, grads = nnx.value_and_grad(
      loss_fn, argnums=nnx.DiffState(0, GATE_PARAMS))(lm)
  optimizer.update(lm, grads)
  return {"kl": kl, "grad_norm": optax.global_norm(grads)}


@nnx.jit(static_argnames=("loss_start", "impl"))
def _eval_step(lm: SeerLM, tokens, *, loss_start: float, impl: str):
  return distill_loss(lm, tokens, loss_start=loss_start, impl=impl)


def eval_kl(lm: SeerLM, batches: Sequence[Batch], *, loss_start: float,
            impl: str = "auto") -> float:
  """Mean of ``distill_loss`` over ``batches`` (their ``inputs``)."""
  values = [float(_eval_step(lm, jnp.asarray(batch["inputs"]),
                             loss_start=loss_start, impl=impl))
            for batch in batches]
  return sum(values) / max(len(values), 1)


@dataclasses.dataclass(frozen=True)
class DistillResult:
  """Summary of a ``distill`` call.

  Attributes:
    start_step: the step it (re)started from.
    final_step: the last step done.
    kl_start: held-out KL of the gates before training (None: no eval
      data, or not in the metrics).
    kl_end: held-out KL at the end (None without eval data).
    train_kl: training KL of the last logged step.
    train_s: seconds in distillation steps, compilation excluded.
    metrics_path: the JSONL metrics file.
  """

  start_step: int
  final_step: int
  kl_start: float | None
  kl_end: float | None
  train_kl: float | None
  train_s: float
  metrics_path: pathlib.Path


def _result(path: pathlib.Path, start: int, step: int, train_s: float
            ) -> DistillResult:
  rows = metrics_lib.read_metrics(path) if path.exists() else []
  evals = {r["step"]: r["kl"] for r in rows if r["kind"] == "eval"}
  train = [r["kl"] for r in rows if r["kind"] == "train"]
  return DistillResult(start_step=start, final_step=step,
                       kl_start=evals.get(0), kl_end=evals.get(step),
                       train_kl=train[-1] if train else None,
                       train_s=train_s, metrics_path=path)


def distill(lm: SeerLM, cfg: TrainConfig, data: StepIterator,
            workdir: str | pathlib.Path, *, loss_start: float = 0.25,
            eval_data: Sequence[Batch] | None = None, impl: str = "auto",
            run_config: dict[str, Any] | None = None,
            log: Callable[[str], None] = print) -> DistillResult:
  """Trains ``lm``'s gates for ``cfg.steps`` steps; the model stays frozen.

  Writes ``<workdir>/metrics.jsonl`` (``kind="train"``: step, kl,
  grad_norm, train_s; ``kind="eval"``: step, held-out kl, step 0 being the
  untrained gates) and orbax checkpoints of the gates and their optimizer
  under ``<workdir>/checkpoints``. A workdir that holds checkpoints is
  continued from the newest good one; one at ``cfg.steps`` trains nothing.

  Args:
    lm: the SeerLM; its gates are trained in place.
    cfg: steps, batch, lr schedule (AdamW, ``optim.make_optimizer``),
      logging and checkpoint intervals.
    data: batches of ``cfg.batch_size`` x ``cfg.seq_len`` (``inputs``).
    workdir: where metrics and checkpoints go.
    loss_start: see ``kl_rows``.
    eval_data: held-out batches for the KL before, during and after.
    impl: of the oracle.
    run_config: JSON-able description; checkpoints of another are refused.
    log: where text lines go.

  Returns:
    A ``DistillResult``.

  Raises:
    CheckpointError: checkpoints that do not fit these gates or config.
    ValueError: batches of another shape than ``cfg`` says.
  """
  if (data.batch_size, data.seq_len) != (cfg.batch_size, cfg.seq_len):
    raise ValueError(f"data yields [{data.batch_size}, {data.seq_len}] "
                     f"batches, TrainConfig wants [{cfg.batch_size}, "
                     f"{cfg.seq_len}]")
  if not 0.0 <= loss_start < 1.0:
    raise ValueError(f"loss_start must be in [0, 1), got {loss_start}")
  workdir = pathlib.Path(workdir)
  optimizer = nnx.Optimizer(lm, optim.make_optimizer(cfg), wrt=GATE_PARAMS)
  ckpt = checkpoint_lib.Checkpointer(
      workdir / "checkpoints", config=run_config, keep=cfg.keep_checkpoints,
      async_save=cfg.async_checkpoints)
  rng = jax.random.key(cfg.seed)
  start, train_s = 0, 0.0
  try:
    if ckpt.latest_step() is not None:
      restored = ckpt.restore(lm.gates, optimizer, rng_like=rng, log=log)
      start, train_s = restored.step, float(restored.extra.get("train_s", 0))
      data.restore(restored.data_state)
      log(f"[distill] resumed from step {start}")
  except BaseException:
    ckpt.close()
    raise
  path = workdir / "metrics.jsonl"
  if start >= cfg.steps:
    ckpt.close()
    log(f"[distill] the checkpoint at step {start} is finished; nothing to "
        "train")
    return _result(path, start, start, train_s)
  evaluate = lambda: eval_kl(lm, eval_data, loss_start=loss_start, impl=impl)
  writer = metrics_lib.MetricsWriter(path, resume_step=start or None)
  show_bar = cfg.progress and sys.stderr.isatty()
  bar = tqdm.tqdm(total=cfg.steps, initial=start, desc="distill",
                  unit="step", disable=not show_bar, dynamic_ncols=True)
  # One jax.jit call a step; lm and optimizer are synced before eval, saves
  # and the return (the frozen model is not donated).
  distill_step = steps_lib.SplitTrainStep(
      lm, optimizer, step_fn=distill_step_fn, loss_start=loss_start,
      impl=impl)
  try:
    if start == 0 and eval_data:
      kl = evaluate()
      writer.write({"kind": "eval", "step": 0, "kl": kl, "train_s": 0.0})
      log(f"[distill] held-out KL of the untrained gates {kl:.4f}")
    for step in range(start, cfg.steps):
      tokens = jnp.asarray(next(data)["inputs"])
      began = time.perf_counter()
      out = distill_step(tokens)
      jax.block_until_ready(out)
      if step > start:  # the first step of a session compiles
        train_s += time.perf_counter() - began
      done = step + 1
      last = done == cfg.steps
      if done % cfg.log_every == 0 or last:
        row = {"kind": "train", "step": done, "kl": float(out["kl"]),
               "grad_norm": float(out["grad_norm"]), "train_s": train_s}
        writer.write(row)
        bar.set_postfix(kl=f"{row['kl']:.4f}")
        if not show_bar and (done % (cfg.log_every * 10) == 0 or last):
          log(f"[distill] step {done}/{cfg.steps} kl {row['kl']:.4f}")
      do_eval = eval_data and ((cfg.eval_every and done % cfg.eval_every == 0)
                               or last)
      do_save = (cfg.ckpt_every and done % cfg.ckpt_every == 0) or last
      if do_eval or do_save:
        distill_step.sync()
      if do_eval:
        kl = evaluate()
        writer.write({"kind": "eval", "step": done, "kl": kl,
                      "train_s": train_s})
        if not show_bar:
          log(f"[distill] step {done} held-out KL {kl:.4f}")
      if do_save:
        ckpt.save(done, lm.gates, optimizer, rng, data.state(),
                  extra={"train_s": train_s})
      bar.update(1)
    ckpt.wait()
  finally:
    distill_step.sync()  # also after an error or interrupt mid-run
    bar.close()
    writer.close()
    ckpt.close()
  return _result(path, start, cfg.steps, train_s)
