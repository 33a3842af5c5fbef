"""``experiments/seer_adapt.py``: presets, command line and the whole run.

One run: train a full-attention TransformerLM on the code corpus with
passkey rows mixed in (``nsa_jax.train``, or continue / report one trained
before), distil one AttnGate per layer against it, then measure gated
sparse decoding at token budgets of 1/16, 1/8 and 1/4 of the context
against dense decoding: held-out code perplexity, passkey retrieval, gate
recall of the oracle's top blocks and decode speed. Everything lands in
``<workdir>``: ``model/`` (the model's run), ``gates/`` (metrics and
checkpoints of the gates alone), ``seer_results.json``, ``seer_summary.md``
and ``seer_budgets.png``. Running the same command again continues what
is unfinished and reuses what is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import shutil
import sys
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from nsa_jax import train
from nsa_jax.modules.transformer import DTYPES
from nsa_jax.seer import distill as distill_lib
from nsa_jax.seer import evaluate as eval_lib
from nsa_jax.seer import report
from nsa_jax.seer.config import SeerConfig
from nsa_jax.seer.config import Selection
from nsa_jax.seer.gate import AttnGate
from nsa_jax.seer.gate import SeerGates
from nsa_jax.seer.model import SeerLM
from nsa_jax.train.config import TrainConfig

BUDGET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
STAGES = ("train", "distill", "eval")


@dataclasses.dataclass(frozen=True)
class AdaptPreset:
  """The settings of one run; the context T is the model preset's seq_len.

  Attributes:
    train_preset: ``nsa_jax.train`` preset of the full-attention model.
    seer: the gates.
    distill_steps, distill_batch, distill_lr, distill_warmup: gate training
      (AdamW, warm-up then cosine, as ``nsa_jax.train``).
    loss_start: the KL covers queries at ``t >= loss_start * T``.
    eval_batches: held-out code batches (perplexity, recall, KL).
    passkey_per_depth: passkey prompts per needle depth (5 depths).
    passkey_batch: prompts generated together.
    speed_batch: rows of the decode-speed measurements.
    speed_iters: timed repetitions.
    speed_heads: (Hq, Hkv, D) of a second, untrained gate and cache whose
      attention is timed too (speed does not depend on the weights); None:
      the model's only.
  """

  train_preset: str
  seer: SeerConfig
  distill_steps: int
  distill_batch: int
  distill_lr: float
  distill_warmup: int
  loss_start: float
  eval_batches: int
  passkey_per_depth: int
  passkey_batch: int
  speed_batch: int
  speed_iters: int
  speed_heads: tuple[int, int, int] | None = None


def _gpu(train_preset: str, distill_batch: int, passkey_per_depth: int
         ) -> AdaptPreset:
  """One H100: the paper's blocks of 64; attention timed at Qwen3-8B's
  heads (Hq 32, Hkv 8, D 128) as well as the model's."""
  return AdaptPreset(
      train_preset=train_preset, seer=SeerConfig(block_size=64, gate_dim=64),
      distill_steps=200, distill_batch=distill_batch, distill_lr=1e-3,
      distill_warmup=20, loss_start=0.25, eval_batches=4,
      passkey_per_depth=passkey_per_depth, passkey_batch=passkey_per_depth,
      speed_batch=8, speed_iters=20, speed_heads=(32, 8, 128))


PRESETS = {
    # One CPU core, a few minutes: T = 512, blocks of 8 (64 blocks, as
    # 4k tokens in the paper's blocks of 64).
    "cpu": AdaptPreset(
        train_preset="seer-cpu", seer=SeerConfig(block_size=8, gate_dim=32),
        distill_steps=100, distill_batch=4, distill_lr=3e-3,
        distill_warmup=10, loss_start=0.25, eval_batches=2,
        passkey_per_depth=4, passkey_batch=10, speed_batch=4,
        speed_iters=10),
    "gpu-8k": _gpu("gpu-8k", distill_batch=8, passkey_per_depth=4),
    "gpu-32k": _gpu("gpu-32k", distill_batch=2, passkey_per_depth=2),
}
DEFAULT_PRESET = "cpu"


def _fractions(text: str) -> tuple[float, ...]:
  values = tuple(float(x) for x in text.split(",") if x)
  if not values or any(not 0 < v <= 1 for v in values):
    raise argparse.ArgumentTypeError(
        f"budget fractions must be in (0, 1], got {text!r}")
  return values


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="seer_adapt.py", description=__doc__, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default=DEFAULT_PRESET,
                      choices=sorted(PRESETS))
  parser.add_argument("--workdir", default=None,
                      help="run directory (default: runs/seer-<preset>)")
  parser.add_argument("--model-workdir", default=None,
                      help="train_lm.py workdir of the full model (default: "
                      "<workdir>/model); its 'full' run is continued, "
                      "reported or trained")
  parser.add_argument("--train-steps", type=int, default=None,
                      help="steps of the model (default: its preset's)")
  parser.add_argument("--distill-steps", type=int, default=None)
  parser.add_argument("--budget-fractions", type=_fractions,
                      default=BUDGET_FRACTIONS,
                      help="token budgets as fractions of the context "
                      "(default: 1/16, 1/8, 1/4)")
  parser.add_argument("--until", choices=STAGES, default="eval",
                      help="stop after this stage (runs can be split across "
                      "calls; each continues where the last stopped)")
  parser.add_argument("--fresh-gates", action="store_true",
                      help="discard the gates' checkpoints and metrics first")
  parser.add_argument("--speed", default=True,
                      action=argparse.BooleanOptionalAction,
                      help="measure decode speed (default: on)")
  parser.add_argument("--figure", default="docs/figures/seer_{preset}.png",
                      help="a copy of the plot ('' for none)")
  parser.add_argument("--progress", default=True,
                      action=argparse.BooleanOptionalAction,
                      help="tqdm bars on a terminal (default: on)")
  return parser


def _log_versions(log):
  log(f"python {platform.python_version()}, jax {jax.__version__}, "
      f"devices {jax.devices()}")


def _model_plan(args, preset: AdaptPreset, workdir: pathlib.Path):
  argv = ["--preset", preset.train_preset, "--attention", "full",
          "--workdir", str(pathlib.Path(args.model_workdir or
                                        workdir / "model"))]
  if args.train_steps is not None:
    argv += ["--steps", str(args.train_steps)]
  if not args.progress:
    argv += ["--no-progress"]
  parsed, parser = train.cli.parse(argv)
  return train.cli.resolve(parsed, parser)


def _distill_config(plan, preset: AdaptPreset, steps: int) -> TrainConfig:
  return dataclasses.replace(
      plan.train, steps=steps, batch_size=preset.distill_batch, grad_accum=1,
      lr=preset.distill_lr, warmup_steps=min(preset.distill_warmup, steps),
      weight_decay=0.0, eval_every=max(steps // 4, 1), eval_batches=(
          preset.eval_batches), ckpt_every=max(steps // 2, 1), log_every=5)


def _quality(lm: SeerLM, model, preset: AdaptPreset, budgets, evals,
             context: int, progress: bool, log) -> dict[str, Any]:
  """Perplexity, passkey and recall: dense and per budget."""
  prompts, keys = eval_lib.passkey_prompts(context, DEPTHS,
                                           preset.passkey_per_depth)
  passkey = lambda m: eval_lib.passkey_accuracy(
      m, prompts, keys, batch_size=preset.passkey_batch, progress=progress)
  dense = {"perplexity": eval_lib.perplexity(model, evals),
           "passkey": passkey(model)}
  log(f"dense: perplexity {dense['perplexity']:.4f}, passkey "
      f"{dense['passkey']:.2f}")
  recall = eval_lib.gate_recall(lm, evals, budgets)
  rows = []
  for budget in eval_lib.progress_bar(budgets, "budgets", progress):
    sparse = lm.with_selection(Selection(budget=budget))
    row = {"fraction": budget / context, "budget": budget,
           "blocks": budget // lm.block_size,
           "perplexity": eval_lib.perplexity(sparse, evals),
           "passkey": passkey(sparse), "recall": recall[budget]}
    row["quality"] = dense["perplexity"] / row["perplexity"]
    log(f"budget {budget}: perplexity {row['perplexity']:.4f}, passkey "
        f"{row['passkey']:.2f}, recall {row['recall']}")
    rows.append(row)
  return {"dense": dense, "budgets": rows}


def _speed(lm: SeerLM, preset: AdaptPreset, budgets, context: int,
           results: dict[str, Any], log) -> None:
  """Adds decode times: whole model (dense and per budget), attention."""
  model, batch, iters = lm.model, preset.speed_batch, preset.speed_iters
  results["dense"]["decode_ms"] = eval_lib.model_decode_ms(
      model, context, batch, iters=iters)
  for row in results["budgets"]:
    row["decode_ms"] = eval_lib.model_decode_ms(
        lm.with_selection(Selection(budget=row["budget"])), context, batch,
        iters=iters)
    log(f"budget {row['budget']}: {row['decode_ms']:.3f} ms a decode step, "
        f"dense {results['dense']['decode_ms']:.3f}")
  gates = [lm.gates.layers[0]]
  if preset.speed_heads is not None:
    gates.append(AttnGate(*preset.speed_heads, preset.seer,
                          rngs=nnx.Rngs(0)))
  on_gpu = jax.default_backend() == "gpu"
  selections = {budget: Selection(budget=budget) for budget in budgets}
  results["attention"] = []
  for gate in gates:
    times = eval_lib.attention_decode_ms(
        gate, context, batch, list(selections.values()),
        dtype=DTYPES[model.config.dtype],
        dense=("pallas_decode", "cudnn", "xla") if on_gpu else ("xla",),
        iters=iters)
    entry = {"heads": [gate.num_heads, gate.num_kv_heads, gate.head_dim],
             "context": context, "batch": batch,
             "dense": {k.removeprefix("dense_"): v for k, v in times.items()
                       if k.startswith("dense_")},
             "sparse": {str(b): times[str(s)] for b, s in selections.items()}}
    log(f"attention {entry['heads']}: {entry}")
    results["attention"].append(entry)


def run(argv: list[str] | None = None, log=print) -> dict[str, Any] | None:
  """The whole experiment; returns the results (None if stopped early)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  preset = PRESETS[args.preset]
  for name in ("train_steps", "distill_steps"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  workdir = pathlib.Path(args.workdir or f"runs/seer-{args.preset}")
  _log_versions(log)
  plan = _model_plan(args, preset, workdir)
  try:
    train.runs.run_plan(dataclasses.replace(plan, plot=False), log=log)
  except (train.CheckpointError, train.runs.RunRefused) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from None
  if args.until == "train":
    return None
  model = train.runs.load_run(plan.workdir / "full", log=log)
  context = plan.train.seq_len
  steps = args.distill_steps or preset.distill_steps
  cfg = _distill_config(plan, preset, steps)
  train_it, evals = train.runs.make_data(
      dataclasses.replace(plan, train=cfg), log)
  gates_dir = workdir / "gates"
  if args.fresh_gates and gates_dir.exists():
    shutil.rmtree(gates_dir)
  lm = SeerLM(model, SeerGates(model.config, preset.seer,
                               rngs=nnx.Rngs(cfg.seed)))
  seer_config = dataclasses.asdict(preset.seer)
  result = distill_lib.distill(
      lm, cfg, train_it, gates_dir, loss_start=preset.loss_start,
      eval_data=evals, log=log,
      run_config={"seer": seer_config, "model": str(plan.workdir / "full"),
                  "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                  "loss_start": preset.loss_start, "seed": cfg.seed})
  if args.until == "distill":
    return None
  budgets = [max(2 * preset.seer.block_size, int(round(f * context)))
             for f in args.budget_fractions]
  measured = _quality(lm, model, preset, budgets, evals, context,
                      args.progress, log)
  results = {
      "preset": args.preset, "context": context,
      "block_size": preset.seer.block_size, "seer": seer_config,
      "model": dataclasses.asdict(model.config), "distill": {
          "steps": result.final_step, "kl_start": result.kl_start,
          "kl_end": result.kl_end, "train_s": result.train_s},
      "device": str(jax.devices()[0]), "jax": jax.__version__,
      "dtype": str(jnp.dtype(DTYPES[model.config.dtype])), **measured}
  if args.speed:
    _speed(lm, preset, budgets, context, results, log)
  table = report.summary_tables(results)
  log(table)
  (workdir / "seer_results.json").write_text(json.dumps(results, indent=1))
  (workdir / "seer_summary.md").write_text(table + "\n")
  title = (f"SeerAttention-R, {args.preset}: T={context}, blocks of "
           f"{preset.seer.block_size}, {jax.devices()[0].platform}")
  png = report.plot_budgets(results, workdir / "seer_budgets.png", title=title)
  log(f"wrote {png}")
  if args.figure:
    copy = pathlib.Path(args.figure.format(preset=args.preset))
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, copy)
    log(f"wrote {copy}")
  return results
