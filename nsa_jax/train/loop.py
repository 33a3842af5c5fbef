"""The training loop: jit steps, eval, JSONL metrics, progress, checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import pathlib
import sys
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import tqdm

from nsa_jax.data import token_ids
from nsa_jax.data.iterators import Batch
from nsa_jax.data.iterators import StepIterator
from nsa_jax.train import checkpoint as checkpoint_lib
from nsa_jax.train import metrics as metrics_lib
from nsa_jax.train import optim
from nsa_jax.train import steps as steps_lib
from nsa_jax.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class RunResult:
  """Summary of a finished ``train`` call.

  Attributes:
    start_step: the step training (re)started from.
    final_step: the last step done.
    final_loss: train loss of the last logged step.
    final_val_loss: validation loss at the end (None without an eval set).
    train_s: seconds spent in train steps, compilation excluded.
    elapsed_s: wall-clock seconds of the run (all sessions).
    metrics_path: the JSONL metrics file.
    peak_bytes: the device's peak allocated bytes at the end (``memory_stats``
      ``peak_bytes_in_use``); None where the backend has no such statistic
      (CPU).
    peak_shared: the peak was already reached before this run's training
      started (an earlier run in the same process): ``peak_bytes`` is then
      only an upper bound of this run's own peak.
  """

  start_step: int
  final_step: int
  final_loss: float | None
  final_val_loss: float | None
  train_s: float
  elapsed_s: float
  metrics_path: pathlib.Path
  peak_bytes: int | None = None
  peak_shared: bool = False


def evaluate(model: nnx.Module, batches: Sequence[Batch],
             parallel=None) -> float:
  """Mean masked cross-entropy (nats/token) over ``batches``.

  ``parallel``: a ``nsa_jax.parallel.Parallelism`` whose mesh holds the
  model, or None (one device).

  Raises:
    ValueError: token ids outside ``model.config.vocab_size``, if it has one.
  """
  vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
  total, count = 0.0, 0.0
  eval_step = steps_lib.eval_step if parallel is None else parallel.eval_step
  for batch in batches:
    loss_sum, n = eval_step(model, _to_device(batch, vocab_size, parallel))
    total += float(loss_sum)
    count += float(n)
  return total / max(count, 1.0)


def _to_device(batch: Batch, vocab_size: int | None = None,
               parallel=None) -> dict[str, jax.Array]:
  """The batch on device (split over ``parallel``'s mesh if given), its
  token ids checked while still on the host."""
  if vocab_size is not None:
    for key in ("inputs", "targets"):
      if key in batch:
        token_ids.check_token_ids(batch[key], vocab_size,
                                   what=f"batch {key!r}")
  if parallel is not None:
    return parallel.put_batch(batch)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _saved_result(metrics_path: pathlib.Path, step: int, steps: int,
                  train_s: float, elapsed_s: float, name: str,
                  log: Callable[[str], None]) -> RunResult:
  """The result of a run whose checkpoint is at or past ``steps``."""
  rows = (metrics_lib.read_metrics(metrics_path)
          if metrics_path.exists() else [])
  rows = [r for r in rows if r.get("step", 0) <= step]
  losses = [r["loss"] for r in rows if r["kind"] == "train"]
  peak, shared = peak_of_rows(rows)
  val_losses = [r["val_loss"] for r in rows if r["kind"] == "eval"]
  what = ("finished" if step == steps
          else f"past the requested {steps} steps")
  log(f"[{name}] the checkpoint at step {step} is {what}; nothing to train")
  return RunResult(start_step=step, final_step=step,
                   final_loss=losses[-1] if losses else None,
                   final_val_loss=val_losses[-1] if val_losses else None,
                   train_s=train_s, elapsed_s=elapsed_s,
                   metrics_path=metrics_path, peak_bytes=peak,
                   peak_shared=shared)


def peak_of_rows(rows: Sequence[dict[str, Any]]) -> tuple[int | None, bool]:
  """(peak bytes, shared) of a run from its train rows; (None, False) if
  none recorded one. Shared when every row at that peak says so."""
  peaks = [r for r in rows if r.get("kind") == "train"
           and r.get("peak_bytes") is not None]
  if not peaks:
    return None, False
  peak = max(r["peak_bytes"] for r in peaks)
  return peak, all(r.get("peak_shared", False) for r in peaks
                   if r["peak_bytes"] == peak)


def _format_eta(seconds: float) -> str:
  minutes, sec = divmod(int(seconds), 60)
  return f"{minutes}m{sec:02d}s"


def train(model: nnx.Module, cfg: TrainConfig, train_data: StepIterator,
          workdir: str | pathlib.Path, *,
          eval_data: Sequence[Batch] | None = None,
          resume: bool = False,
          resume_step: int | None = None,
          run_config: dict[str, Any] | None = None,
          on_accept: Callable[[], None] | None = None,
          name: str = "train",
          log: Callable[[str], None] = print,
          debug_step_delay: float = 0.0,
          parallel=None) -> RunResult:
  """Trains ``model`` in place for ``cfg.steps`` optimizer steps.

  Writes ``<workdir>/metrics.jsonl`` (rows ``kind="train"``: step, loss,
  grad_norm, lr, tokens, tokens_per_s, train_s, elapsed_s, peak_bytes (the
  device's peak memory so far, None on CPU) and peak_shared (see
  ``RunResult``); rows
  ``kind="eval"``: step, val_loss, train_s, elapsed_s) and orbax checkpoints
  under ``<workdir>/checkpoints``. With ``resume=True`` it restores the newest
  good checkpoint (model, optimizer, RNG, data position; a corrupt newer one
  is reported and skipped) and continues so that the remaining steps are
  those of an uninterrupted run. A checkpoint at or past ``cfg.steps`` trains
  nothing: the result reports the run as saved, losses read from its metrics.
  Nothing is written under ``workdir`` before the run is accepted.

  Args:
    model: NNX module, ``model(int32 [B, T]) -> logits [B, T, V]``.
    cfg: the training settings.
    train_data: batches of ``cfg.batch_size`` x ``cfg.seq_len``.
    workdir: run directory.
    eval_data: fixed validation batches, or None.
    resume: continue from ``<workdir>/checkpoints``.
    resume_step: with ``resume``, the checkpoint step to continue from
      (default the newest good one).
    run_config: JSON-able description of model and data; a checkpoint of
      another config is refused.
    on_accept: called once the run is accepted (checkpoint restored, or a
      fresh start allowed), before anything is written; e.g. to save the
      run's config next to it.
    name: label of the progress bar and log lines.
    log: where text lines go.
    debug_step_delay: seconds to sleep after every step (tests that kill a
      run mid-training use it).
    parallel: a ``nsa_jax.parallel.Parallelism``: model, optimizer state
      and batches are split over its mesh (a checkpoint restores onto it,
      whatever mesh saved it). None: one device, as before.

  Returns:
    A ``RunResult``.

  Raises:
    CheckpointError: resuming without a usable checkpoint, or starting fresh
      in a directory that already holds checkpoints.
    ValueError: data whose batch shape disagrees with ``cfg``, or token ids
      outside the model's vocabulary (``model.config.vocab_size``).
  """
  if (train_data.batch_size, train_data.seq_len) != (cfg.batch_size,
                                                     cfg.seq_len):
    raise ValueError(
        f"train data yields [{train_data.batch_size}, {train_data.seq_len}] "
        f"batches, TrainConfig wants [{cfg.batch_size}, {cfg.seq_len}]")
  workdir = pathlib.Path(workdir)
  if parallel is not None:
    parallel.shard(model)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(cfg), wrt=nnx.Param)
  if parallel is not None:
    parallel.shard(optimizer)
  schedule = optim.make_schedule(cfg)
  ckpt = checkpoint_lib.Checkpointer(
      workdir / "checkpoints", config=run_config, keep=cfg.keep_checkpoints,
      async_save=cfg.async_checkpoints)
  rng = jax.random.key(cfg.seed)
  start, train_s, elapsed_before = 0, 0.0, 0.0
  try:
    if resume_step is not None and not resume:
      raise ValueError("resume_step needs resume=True")
    if resume:
      restored = ckpt.restore(model, optimizer, step=resume_step,
                              rng_like=rng, log=log)
      start, rng = restored.step, restored.rng
      ckpt.set_aside_after(start, log=log)
      train_data.restore(restored.data_state)
      train_s = float(restored.extra.get("train_s", 0.0))
      elapsed_before = float(restored.extra.get("elapsed_s", 0.0))
      log(f"[{name}] resumed from {ckpt.directory / str(start)} at step "
          f"{start}")
    elif ckpt.latest_step() is not None:
      raise checkpoint_lib.CheckpointError(
          f"{ckpt.directory} already holds checkpoints (steps "
          f"{ckpt.complete_steps()}); pass resume=True (--resume) to continue "
          "that run or choose a new workdir")
  except BaseException:
    ckpt.close()  # stop orbax's background workers before the error leaves
    raise
  if on_accept is not None:
    on_accept()
  if start >= cfg.steps:
    ckpt.close()
    return _saved_result(workdir / "metrics.jsonl", start, cfg.steps, train_s,
                         elapsed_before, name, log)
  vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
  # Several hosts (jax.distributed): process 0 writes metrics.jsonl, the
  # others a file of their own, never the same one.
  metrics_name = ("metrics.jsonl" if jax.process_index() == 0
                  else f"metrics.process{jax.process_index()}.jsonl")
  writer = metrics_lib.MetricsWriter(
      workdir / metrics_name, resume_step=start if resume else None)
  show_bar = cfg.progress and sys.stderr.isatty()
  bar = tqdm.tqdm(total=cfg.steps, initial=start, desc=name, unit="step",
                  disable=not show_bar, dynamic_ncols=True)
  session_start = time.perf_counter()
  peak_before = metrics_lib.peak_bytes_in_use()
  # Timing covers train steps only: a segment opens after each step that
  # compiled, logged, evaluated or saved, and closes (blocking) before the
  # next of those.
  seg_start, compiled = None, False
  window_steps, window_s = 0, 0.0  # since the last train row
  loss = val_loss = None
  peak = None

  def peak_shared():
    return bool(peak_before) and peak == peak_before

  def elapsed():
    return elapsed_before + time.perf_counter() - session_start

  def close_segment(out):
    nonlocal seg_start, train_s, window_s
    jax.block_until_ready(out)
    if seg_start is not None:
      spent = time.perf_counter() - seg_start
      train_s += spent
      window_s += spent
    seg_start = None

  # One jax.jit call a step on the split state; the model and optimizer
  # objects are brought up to date before eval, saves and the return.
  train_step = steps_lib.SplitTrainStep(
      model, optimizer, grad_accum=cfg.grad_accum,
      step_fn=(steps_lib.train_step_fn if parallel is None
               else parallel.train_step_fn))

  try:
    for step in range(start, cfg.steps):
      batch = _to_device(next(train_data), vocab_size, parallel)
      t0 = time.perf_counter()
      out = train_step(batch)
      done = step + 1
      is_last = done == cfg.steps
      if not compiled:
        jax.block_until_ready(out)
        compiled = True
        log(f"[{name}] compiled and ran step {done} in "
            f"{time.perf_counter() - t0:.1f}s")
      elif seg_start is not None:
        window_steps += 1
      do_log = done % cfg.log_every == 0 or is_last
      do_eval = bool(eval_data) and (
          (cfg.eval_every and done % cfg.eval_every == 0) or is_last)
      do_save = (cfg.ckpt_every and done % cfg.ckpt_every == 0) or is_last
      if do_log or do_eval or do_save:
        close_segment(out)
      if do_eval or do_save:
        # The next step donates these arrays again: orbax's save copies
        # them to the host before it returns (async saves write after).
        train_step.sync()
      if do_log:
        loss = float(out["loss"])
        tokens_per_s = (window_steps * cfg.tokens_per_step / window_s
                        if window_steps and window_s > 0 else None)
        window_steps, window_s = 0, 0.0
        peak = metrics_lib.peak_bytes_in_use()
        writer.write({
            "kind": "train", "step": done, "loss": loss,
            "grad_norm": float(out["grad_norm"]),
            "lr": float(schedule(step)),
            "tokens": done * cfg.tokens_per_step,
            "tokens_per_s": tokens_per_s, "train_s": train_s,
            "elapsed_s": elapsed(), "peak_bytes": peak,
            "peak_shared": peak_shared()})
        rate = f"{tokens_per_s:.0f}" if tokens_per_s else "-"
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=rate)
        if not show_bar and (done % (cfg.log_every * 10) == 0 or is_last):
          eta = (cfg.steps - done) * train_s / max(done - start - 1, 1)
          log(f"[{name}] step {done}/{cfg.steps} loss {loss:.4f} "
              f"{rate} tok/s eta {_format_eta(eta)} peak memory "
              f"{metrics_lib.format_bytes(peak, peak_shared())}")
      if do_eval:
        val_loss = evaluate(model, eval_data, parallel)
        writer.write({"kind": "eval", "step": done, "val_loss": val_loss,
                      "train_s": train_s, "elapsed_s": elapsed()})
        if not show_bar:
          log(f"[{name}] step {done} val_loss {val_loss:.4f}")
      if do_save:
        ckpt.save(done, model, optimizer, rng, train_data.state(),
                  extra={"train_s": train_s, "elapsed_s": elapsed()})
      bar.update(1)
      if debug_step_delay:
        time.sleep(debug_step_delay)
      if seg_start is None:
        seg_start = time.perf_counter()
    ckpt.wait()
  finally:
    train_step.sync()  # also after an error or interrupt mid-run
    bar.close()
    writer.close()
    ckpt.close()
  peak, shared = peak_of_rows(metrics_lib.read_metrics(writer.path))
  return RunResult(start_step=start, final_step=cfg.steps, final_loss=loss,
                   final_val_loss=val_loss, train_s=train_s,
                   elapsed_s=elapsed(), metrics_path=writer.path,
                   peak_bytes=peak, peak_shared=shared)
