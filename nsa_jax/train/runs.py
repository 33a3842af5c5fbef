"""Runs of ``experiments/train_lm.py``: data, run directories, the summary.

A run of one attention type lives in ``<workdir>/<attention>/``:
``run_config.json`` (model, data and training settings), ``metrics.jsonl``
and ``checkpoints/``. ``run_plan`` trains every model of a ``Plan`` there
and writes ``<workdir>/summary.md``, ``summary.json`` and
``loss_curves.png``.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import json
import pathlib
import shutil
import sys
from typing import Any

from flax import nnx
import jax
import numpy as np

from nsa_jax import data
from nsa_jax.config import NSAConfig
from nsa_jax.modules.transformer import LMConfig
from nsa_jax.modules.transformer import TransformerLM
from nsa_jax.train import checkpoint as checkpoint_lib
from nsa_jax.train import loop
from nsa_jax.train import metrics
from nsa_jax.train import optim
from nsa_jax.train import plotting
from nsa_jax.train.cli import Plan
from nsa_jax.train.config import TrainConfig

RUN_CONFIG = "run_config.json"
# Keys of run_config.json that do not identify a run: a run continues under
# other values of them. "execution" holds LMConfig fields that change memory
# and speed, not the math (EXECUTION_FIELDS).
_UNCHECKED = ("train", "execution")
EXECUTION_FIELDS = ("remat",)
_RUN_FILES = (RUN_CONFIG, "metrics.jsonl", "checkpoints")


class RunRefused(RuntimeError):
  """A run directory holds a run this plan may not continue or replace."""


def make_data(plan: Plan, log: Callable[[str], None] = print):
  """(train iterator, eval batches) for the plan's data settings."""
  cfg, d = plan.train, plan.data
  if d["data"] == "code":
    corpus = data.build_corpus(
        d["corpus_dir"] or None, val_fraction=d["val_fraction"],
        max_bytes=d["max_corpus_bytes"] or None)
    log(corpus.summary())
    train_it = data.PackedIterator(corpus.train, cfg.batch_size, cfg.seq_len,
                                   seed=cfg.seed, documents=d["documents"])
    evals = data.eval_batches(corpus.val, cfg.micro_batch_size, cfg.seq_len,
                              cfg.eval_batches, documents=d["documents"])
  else:
    train_it = data.SyntheticIterator(d["data"], cfg.batch_size, cfg.seq_len,
                                      seed=cfg.seed)
    held_out = data.SyntheticIterator(d["data"], cfg.micro_batch_size,
                                      cfg.seq_len, seed=cfg.seed + 10_000)
    evals = [next(held_out) for _ in range(cfg.eval_batches)]
  if d["passkey_rows"]:
    passkeys = data.SyntheticIterator("passkey", d["passkey_rows"],
                                      cfg.seq_len, seed=cfg.seed + 1)
    train_it = data.MixedIterator(train_it, passkeys, d["passkey_rows"])
  return train_it, evals


def run_config(plan: Plan, model: LMConfig) -> dict[str, Any]:
  """What a checkpoint of this run must have been saved under.

  ``EXECUTION_FIELDS`` of the model are left out: resuming with remat on or
  off is the same run.
  """
  fields = {k: v for k, v in dataclasses.asdict(model).items()
            if k not in EXECUTION_FIELDS}
  return {"model": fields, "data": plan.data,
          "batch_size": plan.train.batch_size,
          "seq_len": plan.train.seq_len, "seed": plan.train.seed}


def load_model_config(run_dir: str | pathlib.Path) -> LMConfig:
  """The LMConfig a run saved in ``<run_dir>/run_config.json``."""
  saved = json.loads((pathlib.Path(run_dir) / RUN_CONFIG).read_text())
  model = {**saved["model"], **saved.get("execution", {})}
  return LMConfig(**{**model, "nsa": NSAConfig(**model["nsa"])})


def load_run(run_dir: str | pathlib.Path,
             log: Callable[[str], None] = print) -> TransformerLM:
  """The model of a run, from its newest good checkpoint.

  Raises:
    FileNotFoundError: ``run_dir`` has no ``run_config.json``.
    CheckpointError: no checkpoint fits that config.
  """
  run_dir = pathlib.Path(run_dir)
  path = run_dir / RUN_CONFIG
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: is {run_dir} a train_lm.py run?")
  saved = json.loads(path.read_text())
  model = TransformerLM(load_model_config(run_dir), rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, optim.make_optimizer(TrainConfig(**saved["train"])),
      wrt=nnx.Param)
  with checkpoint_lib.Checkpointer(
      run_dir / "checkpoints",
      config={k: v for k, v in saved.items() if k not in _UNCHECKED}) as ckpt:
    step = ckpt.restore(model, optimizer, log=log).step
  log(f"loaded {run_dir} at step {step}")
  return model


def load_runs_or_exit(workdir: str | pathlib.Path, attention: str):
  """Yields (name, model) for each run named in a comma list, for scripts.

  A missing or unusable run ends the script with its message on stderr and
  exit status 1 (no traceback).
  """
  for name in [a.strip() for a in attention.split(",") if a.strip()]:
    try:
      model = load_run(pathlib.Path(workdir) / name)
    except (FileNotFoundError, checkpoint_lib.CheckpointError) as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(1) from e
    yield name, model


def _check_run_dir(run_dir: pathlib.Path, config: dict[str, Any],
                   mode: str) -> bool:
  """Whether to resume in ``run_dir``; refuses a run of another config.

  Reads only; ``mode`` is the plan's mode.
  """
  if mode == "fresh":
    return False
  path = run_dir / RUN_CONFIG
  if path.exists():
    saved = json.loads(path.read_text())
    saved = {k: v for k, v in saved.items() if k not in _UNCHECKED}
    if saved != json.loads(json.dumps(config)):
      diff = sorted(k for k in set(saved) | set(config)
                    if saved.get(k) != config.get(k))
      raise RunRefused(
          f"{run_dir} holds a run of another config (differing: "
          f"{', '.join(diff)}); pass --fresh to discard it or choose "
          "another --workdir")
  has_checkpoints = bool(checkpoint_lib.scan(run_dir / "checkpoints")[0])
  return mode == "resume" or has_checkpoints


def _discard(run_dir: pathlib.Path, log: Callable[[str], None]) -> None:
  for name in _RUN_FILES:
    path = run_dir / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()
  log(f"discarded the earlier run in {run_dir} (--fresh)")


def _param_count(model) -> int:
  return sum(int(np.prod(x.shape)) for x in
             jax.tree.leaves(nnx.state(model, nnx.Param)))


def _num(value: float | None, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def summarize(results: dict[str, dict[str, Any]]) -> str:
  """A markdown table comparing the runs, including val loss at equal time.

  Losses a run did not log (None) show as ``-``; so does the peak memory of
  a backend without memory statistics (CPU). A peak written ``<= X`` was
  reached before the run started (an earlier run in the same process), so
  it bounds the run's own peak from above.
  """
  budget = min(r["train_s"] for r in results.values())
  lines = [
      f"| attention | params | steps | final train loss | final val loss | "
      f"val loss at {budget:.0f}s train time | train time (s) | tokens/s | "
      f"peak memory |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    rows = metrics.read_metrics(r["metrics"]) if pathlib.Path(
        r["metrics"]).exists() else []
    rates = [x["tokens_per_s"] for x in rows
             if x["kind"] == "train" and x.get("tokens_per_s")]
    evals = [x["val_loss"] for x in rows
             if x["kind"] == "eval" and x["train_s"] <= budget + 1e-6]
    lines.append(
        f"| {name} | {r['params']:,} | {r['steps']} | "
        f"{_num(r['loss'], '.4f')} | {_num(r['val_loss'], '.4f')} | "
        f"{_num(evals[-1] if evals else None, '.4f')} | "
        f"{r['train_s']:.1f} | {np.median(rates) if rates else 0:.0f} | "
        f"{metrics.format_bytes(r.get('peak_bytes'), r.get('peak_shared'))} "
        f"|")
  return "\n".join(lines)


def run_plan(plan: Plan, log: Callable[[str], None] = print,
             parallel=None) -> dict[str, dict[str, Any]]:
  """Trains (or continues, or reports) every model of ``plan``.

  Every run directory is checked before anything is written: a directory
  holding a run of another config is refused (unless ``plan.mode`` is
  "fresh"); ``run_config.json`` is written once its run is accepted.

  ``parallel``: a ``nsa_jax.parallel.Parallelism`` to train on (models are
  created on its mesh), or None for one device.

  Returns:
    Per attention type: params, steps, loss, val_loss, train_s,
    peak_bytes, peak_shared (see ``loop.RunResult``), metrics.

  Raises:
    RunRefused: a directory holds a run of another config.
    CheckpointError: resuming without a usable checkpoint.
  """
  configs = {name: run_config(plan, cfg) for name, cfg in plan.models.items()}
  resume = {name: _check_run_dir(plan.workdir / name, configs[name], plan.mode)
            for name in plan.models}
  train_it, evals = make_data(plan, log)
  results = {}
  for name, model_cfg in plan.models.items():
    run_dir = plan.workdir / name
    if plan.mode == "fresh":
      _discard(run_dir, log)
    make = functools.partial(  # the Rngs are made where the model is
        lambda cfg: TransformerLM(cfg, rngs=nnx.Rngs(plan.train.seed)),
        model_cfg)
    model = make() if parallel is None else parallel.create(make)
    log(f"[{name}] {model_cfg}")
    log(f"[{name}] {_param_count(model):,} parameters")
    train_it.restore({**train_it.state(), "step": 0})

    def write_config(run_dir=run_dir, name=name, model_cfg=model_cfg):
      run_dir.mkdir(parents=True, exist_ok=True)
      execution = {k: getattr(model_cfg, k) for k in EXECUTION_FIELDS}
      (run_dir / RUN_CONFIG).write_text(json.dumps(
          {**configs[name], "train": dataclasses.asdict(plan.train),
           "execution": execution}, indent=1))

    result = loop.train(
        model, plan.train, train_it, run_dir, eval_data=evals,
        resume=resume[name], resume_step=plan.resume_step,
        run_config=configs[name], on_accept=write_config, name=name, log=log,
        debug_step_delay=plan.debug_step_delay, parallel=parallel)
    results[name] = {"params": _param_count(model),
                     "steps": result.final_step, "loss": result.final_loss,
                     "val_loss": result.final_val_loss,
                     "train_s": result.train_s,
                     "peak_bytes": result.peak_bytes,
                     "peak_shared": result.peak_shared,
                     "metrics": str(result.metrics_path)}
  table = summarize(results)
  log(table)
  plan.workdir.mkdir(parents=True, exist_ok=True)
  (plan.workdir / "summary.md").write_text(table + "\n")
  (plan.workdir / "summary.json").write_text(json.dumps(results, indent=1))
  if plan.plot:
    png = plotting.plot_runs(
        {n: r["metrics"] for n, r in results.items()},
        plan.workdir / "loss_curves.png",
        title=f"{plan.preset}: T={plan.train.seq_len}, "
              f"{plan.train.steps} steps")
    log(f"wrote {png}")
  return results
