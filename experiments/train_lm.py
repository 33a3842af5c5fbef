"""Trains NSA and full-attention LMs side by side and compares their losses.

  python experiments/train_lm.py                      # = --preset cpu-demo
  python experiments/train_lm.py --preset gpu-8k --steps 300
  python experiments/train_lm.py --preset cpu-demo --resume   # after a crash

Every field of LMConfig, NSAConfig (prefixed ``nsa_``) and TrainConfig is a
flag that overrides the preset. Each attention type trains in
``<workdir>/<attention>/`` (metrics.jsonl, checkpoints/, run_config.json);
the comparison lands in ``<workdir>/summary.md`` and ``loss_curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
from typing import Any

from flax import nnx
import jax
import numpy as np

from nsa_jax import data
from nsa_jax import train as train_lib
from nsa_jax.config import NSAConfig
from nsa_jax.modules import LMConfig
from nsa_jax.modules import TransformerLM

_MODEL_SKIP = ("nsa", "attention")
_DATA_DEFAULTS = {"data": "code", "passkey_rows": 0, "corpus_dir": "",
                  "max_corpus_bytes": 0, "val_fraction": 0.05}
_CPU_DEMO = {
    "d_model": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
    "head_dim": 32, "mlp_hidden": 384, "dtype": "float32",
    "nsa_cmp_block": 16, "nsa_cmp_stride": 8, "nsa_sel_block": 32,
    "nsa_num_selected": 4, "nsa_window": 64,
    "steps": 200, "batch_size": 4, "seq_len": 512, "lr": 3e-3,
    "warmup_steps": 20, "log_every": 5, "eval_every": 25, "eval_batches": 2,
    "ckpt_every": 100, "max_corpus_bytes": 4_000_000,
}


def _gpu(seq_len: int, batch_size: int) -> dict[str, Any]:
  """Short GPU runs (minutes on one H100/H200) at long context, paper NSA."""
  return {
      "d_model": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 2,
      "head_dim": 64, "mlp_hidden": 1536, "dtype": "bfloat16",
      "steps": 600, "batch_size": batch_size, "seq_len": seq_len,
      "lr": 1.5e-3, "warmup_steps": 60, "log_every": 10, "eval_every": 100,
      "eval_batches": 4, "ckpt_every": 200, "passkey_rows": 1,
  }


PRESETS: dict[str, dict[str, Any]] = {
    "cpu-demo": _CPU_DEMO,
    "gpu-8k": _gpu(8192, 8),
    "gpu-16k": _gpu(16384, 4),
    "gpu-32k": _gpu(32768, 2),
}


def _parse_bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _flag_type(default: Any):
  if isinstance(default, bool):
    return _parse_bool
  if isinstance(default, (int, float, str)):
    return type(default)
  return int  # optional ints of LMConfig (v_head_dim, mlp_hidden)


def _add_fields(group, cls, prefix: str = "", skip=()) -> None:
  for field in dataclasses.fields(cls):
    if field.name in skip:
      continue
    default = field.default
    group.add_argument(
        f"--{prefix}{field.name}", type=_flag_type(default), default=None,
        metavar=type(default).__name__.upper() if default is not None
        else "INT", help=f"{cls.__name__}.{field.name} (default {default!r})")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
      usage="%(prog)s [--preset NAME] [--FLAG VALUE ...]  (all flags: -h)")
  run = parser.add_argument_group("run")
  run.add_argument("--preset", default="cpu-demo", choices=sorted(PRESETS))
  run.add_argument("--attention", default="nsa,full",
                   help="comma-separated attention types to train: nsa,full")
  run.add_argument("--workdir", default=None,
                   help="run directory (default runs/<preset>)")
  run.add_argument("--resume", action="store_true",
                   help="continue each run from its latest complete checkpoint")
  run.add_argument("--no_progress", action="store_true",
                   help="no progress bar")
  run.add_argument("--no_plot", action="store_true", help="skip the PNG")
  run.add_argument("--debug_step_delay", type=float, default=0.0,
                   help=argparse.SUPPRESS)
  datag = parser.add_argument_group("data")
  datag.add_argument("--data", choices=("code", "passkey", "mqar"),
                     default=None, help="training data (default code)")
  datag.add_argument("--passkey_rows", type=int, default=None,
                     help="rows per batch replaced by passkey examples")
  datag.add_argument("--corpus_dir", default=None,
                     help="directory of .py files (default: the stdlib)")
  datag.add_argument("--max_corpus_bytes", type=int, default=None,
                     help="read at most about this many bytes (0: all)")
  datag.add_argument("--val_fraction", type=float, default=None)
  _add_fields(parser.add_argument_group("model (LMConfig)"), LMConfig,
              skip=_MODEL_SKIP)
  _add_fields(parser.add_argument_group("NSA (NSAConfig)"), NSAConfig,
              prefix="nsa_")
  _add_fields(parser.add_argument_group("training (TrainConfig)"),
              train_lib.TrainConfig)
  return parser


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a run needs, resolved from preset and flags."""

  models: dict[str, LMConfig]
  train: train_lib.TrainConfig
  data: dict[str, Any]
  workdir: pathlib.Path


def _pick(values: dict[str, Any], cls, prefix: str = "", skip=()):
  names = {f.name for f in dataclasses.fields(cls)} - set(skip)
  return {n: values[prefix + n] for n in names if prefix + n in values}


def resolve(args: argparse.Namespace,
            parser: argparse.ArgumentParser) -> Plan:
  """Merges preset and flags into validated configs; bad values exit(2)."""
  values = {**_DATA_DEFAULTS, **PRESETS[args.preset]}
  values.update({k: v for k, v in vars(args).items() if v is not None})
  if args.no_progress:
    values["progress"] = False
  if args.warmup_steps is None and values.get("warmup_steps", 0) > values.get(
      "steps", 1):
    values["warmup_steps"] = values["steps"] // 10  # a short --steps run
  attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
  if not attentions or len(set(attentions)) != len(attentions):
    parser.error(f"--attention={args.attention!r} must list distinct types")
  try:
    nsa = NSAConfig(**_pick(values, NSAConfig, "nsa_"))
    models = {a: LMConfig(**_pick(values, LMConfig, skip=_MODEL_SKIP),
                          attention=a, nsa=nsa) for a in attentions}
    train_cfg = train_lib.TrainConfig(**_pick(values, train_lib.TrainConfig))
  except (ValueError, TypeError) as e:
    parser.error(str(e))
  if models[attentions[0]].vocab_size < data.VOCAB_SIZE:
    parser.error(f"--vocab_size must be >= {data.VOCAB_SIZE} (byte tokens)")
  if not 0 <= values["passkey_rows"] < train_cfg.batch_size:
    parser.error(f"--passkey_rows={values['passkey_rows']} must be in "
                 f"[0, batch_size={train_cfg.batch_size})")
  if not 0.0 < values["val_fraction"] < 1.0:
    parser.error(f"--val_fraction={values['val_fraction']} must be in (0, 1)")
  workdir = pathlib.Path(args.workdir or f"runs/{args.preset}")
  data_cfg = {k: values[k] for k in _DATA_DEFAULTS}
  return Plan(models=models, train=train_cfg, data=data_cfg, workdir=workdir)


def make_data(plan: Plan):
  """(train iterator, eval batches) for the plan's data settings."""
  cfg, d = plan.train, plan.data
  if d["data"] == "code":
    corpus = data.build_corpus(
        d["corpus_dir"] or None, val_fraction=d["val_fraction"],
        max_bytes=d["max_corpus_bytes"] or None)
    print(corpus.summary())
    train_it = data.PackedIterator(corpus.train, cfg.batch_size, cfg.seq_len,
                                   seed=cfg.seed)
    evals = data.eval_batches(corpus.val, cfg.micro_batch_size, cfg.seq_len,
                              cfg.eval_batches)
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


def model_config_dict(cfg: LMConfig) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def load_model_config(run_dir: pathlib.Path) -> LMConfig:
  """The LMConfig a run of this script saved in ``run_config.json``."""
  saved = json.loads((run_dir / "run_config.json").read_text())["model"]
  return LMConfig(**{**saved, "nsa": NSAConfig(**saved["nsa"])})


def _param_count(model) -> int:
  return sum(int(np.prod(x.shape)) for x in
             jax.tree.leaves(nnx.state(model, nnx.Param)))


def _val_at(rows, budget_s: float) -> float | None:
  evals = [r for r in rows if r["kind"] == "eval" and r["train_s"] <= budget_s]
  return evals[-1]["val_loss"] if evals else None


def summarize(results: dict[str, dict[str, Any]]) -> str:
  """A markdown table comparing the runs, including val loss at equal time."""
  budget = min(r["train_s"] for r in results.values())
  lines = [
      f"| attention | params | steps | final train loss | final val loss | "
      f"val loss at {budget:.0f}s train time | train time (s) | tokens/s |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    rows = train_lib.read_metrics(r["metrics"])
    rates = [x["tokens_per_s"] for x in rows
             if x["kind"] == "train" and x.get("tokens_per_s")]
    at_budget = _val_at(rows, budget + 1e-6)
    lines.append(
        f"| {name} | {r['params']:,} | {r['steps']} | {r['loss']:.4f} | "
        f"{r['val_loss']:.4f} | "
        f"{'-' if at_budget is None else f'{at_budget:.4f}'} | "
        f"{r['train_s']:.1f} | {np.median(rates) if rates else 0:.0f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
  parser = build_parser()
  args = parser.parse_args(argv)
  plan = resolve(args, parser)
  print(f"python {platform.python_version()}, jax {jax.__version__}, "
        f"devices {jax.devices()}")
  print(f"preset {args.preset}: {plan.train}")
  train_it, evals = make_data(plan)
  results = {}
  for name, model_cfg in plan.models.items():
    run_dir = plan.workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = {"model": model_config_dict(model_cfg), "data": plan.data,
                  "batch_size": plan.train.batch_size,
                  "seq_len": plan.train.seq_len, "seed": plan.train.seed}
    (run_dir / "run_config.json").write_text(json.dumps(
        {**run_config, "train": dataclasses.asdict(plan.train)}, indent=1))
    model = TransformerLM(model_cfg, rngs=nnx.Rngs(plan.train.seed))
    print(f"[{name}] {model_cfg}")
    train_it.restore({**train_it.state(), "step": 0})
    try:
      result = train_lib.train(
          model, plan.train, train_it, run_dir, eval_data=evals,
          resume=args.resume, run_config=run_config, name=name,
          debug_step_delay=args.debug_step_delay)
    except train_lib.CheckpointError as e:
      print(f"error: {e}", file=sys.stderr)
      raise SystemExit(1) from e
    results[name] = {"params": _param_count(model), "steps": result.final_step,
                     "loss": result.final_loss,
                     "val_loss": result.final_val_loss,
                     "train_s": result.train_s,
                     "metrics": str(result.metrics_path)}
  table = summarize(results)
  print(table)
  (plan.workdir / "summary.md").write_text(table + "\n")
  (plan.workdir / "summary.json").write_text(json.dumps(results, indent=1))
  if not args.no_plot:
    png = train_lib.plot_runs(
        {n: r["metrics"] for n, r in results.items()},
        plan.workdir / "loss_curves.png",
        title=f"{args.preset}: T={plan.train.seq_len}, "
              f"{plan.train.steps} steps")
    print(f"wrote {png}")
  return results


if __name__ == "__main__":
  main()
