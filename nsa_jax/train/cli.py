"""Command line of ``experiments/train_lm.py``: flags, presets, validation.

Every field of ``LMConfig``, ``NSAConfig`` (prefixed ``nsa-``) and
``TrainConfig`` is a flag spelled with dashes (``--seq-len``,
``--nsa-cmp-block``); booleans come as ``--flag``/``--no-flag``. A flag that
is not given takes the value of ``--preset`` (``--help`` shows the values of
the preset named on the same command line).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Any

from nsa_jax.config import NSAConfig
from nsa_jax.data import tokenizer
from nsa_jax.modules.transformer import count_params
from nsa_jax.modules.transformer import LMConfig
from nsa_jax.modules.transformer import match_mlp_hidden
from nsa_jax.parallel import flags as device_flags
from nsa_jax.train.config import TrainConfig
from nsa_jax.train.presets import DATA_DEFAULTS
from nsa_jax.train.presets import DEFAULT_PRESET
from nsa_jax.train.presets import PRESETS

_MODEL_SKIP = ("nsa", "attention")
_DATA_HELP = {
    "data": "training data: code, passkey or mqar",
    "passkey_rows": "rows per batch replaced by passkey examples",
    "corpus_dir": "directory of .py files ('' reads the stdlib)",
    "max_corpus_bytes": "read at most about this many bytes (0: all)",
    "val_fraction": "share of the corpus files held out for validation",
    "documents": "code data: attend only within each file (segment ids)",
}

DESCRIPTION = """\
Trains NSA and full-attention LMs side by side and compares their losses.

  python experiments/train_lm.py                      # = --preset cpu-demo
  python experiments/train_lm.py --preset gpu-8k --steps 300
  python experiments/train_lm.py --preset gpu-8k --help   # its values

Each attention type trains in <workdir>/<attention>/ (metrics.jsonl,
checkpoints/, run_config.json); the comparison lands in <workdir>/summary.md
and loss_curves.png. Running the same command again continues the run from
its newest good checkpoint; a finished run is not retrained, its results are
printed and plotted again. --fresh discards earlier runs in the workdir and
starts over; --resume insists on a checkpoint; --resume-step picks one. A run
whose config differs from the one saved in its directory is refused before
anything is written.
"""


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a run needs, resolved from preset and flags.

  Attributes:
    preset: the preset's name.
    models: LMConfig per attention type, in training order.
    train: the training settings.
    data: the data settings (keys of ``DATA_DEFAULTS``).
    workdir: the run directory.
    mode: "auto" (continue what is there, else start), "fresh" (discard
      what is there) or "resume" (a checkpoint must exist).
    resume_step: the checkpoint step to continue from, or None (newest).
    plot: write the loss-curve PNG.
    debug_step_delay: seconds slept after every step (tests).
    devices: the mesh, context parallelism and hosts
      (``nsa_jax.parallel.flags``); the default is one device.
  """

  preset: str
  models: dict[str, LMConfig]
  train: TrainConfig
  data: dict[str, Any]
  workdir: pathlib.Path
  mode: str = "auto"
  resume_step: int | None = None
  plot: bool = True
  debug_step_delay: float = 0.0
  devices: device_flags.ScaleOut = device_flags.ScaleOut()


def preset_values(name: str) -> dict[str, Any]:
  """Flag values of preset ``name`` (data defaults included)."""
  return {**DATA_DEFAULTS, **PRESETS[name]}


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def _add(group, dest: str, default: Any, help_text: str,
         values: dict[str, Any], preset: str) -> None:
  """One flag whose help shows the value a run with ``preset`` uses."""
  used = values.get(dest, default)
  where = f"preset {preset}" if dest in PRESETS[preset] else "built-in"
  help_text = f"{help_text} (default: {used!r}, {where})"
  if isinstance(default, bool):
    group.add_argument(_flag(dest), dest=dest, default=None,
                       action=argparse.BooleanOptionalAction, help=help_text)
    return
  kind = type(default) if isinstance(default, (int, float, str)) else int
  group.add_argument(_flag(dest), dest=dest, type=kind, default=None,
                     metavar=kind.__name__.upper(), help=help_text)


def _add_fields(group, cls, values, preset, prefix="", skip=()) -> None:
  for field in dataclasses.fields(cls):
    if field.name not in skip:
      _add(group, prefix + field.name, field.default,
           f"{cls.__name__}.{field.name}", values, preset)


def build_parser(preset: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
  """The parser; help texts show the values ``preset`` gives each flag."""
  values = preset_values(preset)
  parser = argparse.ArgumentParser(
      prog="train_lm.py", description=DESCRIPTION, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      usage="%(prog)s [--preset NAME] [--FLAG VALUE ...]  (all flags: -h)")
  run = parser.add_argument_group("run")
  run.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"named flag values (default: {DEFAULT_PRESET})")
  run.add_argument("--attention", default="nsa,full",
                   help="comma-separated attention types to train "
                   "(default: nsa,full)")
  run.add_argument("--workdir", default=None,
                   help="run directory (default: runs/<preset>)")
  start = run.add_mutually_exclusive_group()
  start.add_argument("--resume", action="store_true",
                     help="continue each run from its newest good checkpoint;"
                     " fail if there is none")
  start.add_argument("--fresh", action="store_true",
                     help="delete earlier runs of these attention types in "
                     "the workdir and start over")
  run.add_argument("--resume-step", type=int, default=None, metavar="STEP",
                   help="continue from this checkpoint step (implies "
                   "--resume)")
  run.add_argument("--match-params", action="store_true",
                   help="widen the full model's SwiGLU (--mlp-hidden) until "
                   "its parameter count is nearest the NSA model's (fair "
                   "comparison; default: same shape, NSA larger)")
  run.add_argument("--plot", default=True,
                   action=argparse.BooleanOptionalAction,
                   help="write loss_curves.png (default: on)")
  run.add_argument("--debug-step-delay", type=float, default=0.0,
                   help=argparse.SUPPRESS)
  data_group = parser.add_argument_group("data")
  for dest, default in DATA_DEFAULTS.items():
    _add(data_group, dest, default, _DATA_HELP[dest], values, preset)
  _add_fields(parser.add_argument_group("model (LMConfig)"), LMConfig,
              values, preset, skip=_MODEL_SKIP)
  _add_fields(parser.add_argument_group("NSA (NSAConfig)"), NSAConfig,
              values, preset, prefix="nsa_")
  _add_fields(parser.add_argument_group("training (TrainConfig)"),
              TrainConfig, values, preset)
  device_flags.add_flags(parser)
  return parser


def parse(argv: list[str] | None = None
          ) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
  """Parses ``argv``; unknown flags, old underscore spellings, exit(2)."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--preset", default=DEFAULT_PRESET)
  known, _ = pre.parse_known_args(argv)
  parser = build_parser(known.preset if known.preset in PRESETS
                        else DEFAULT_PRESET)
  args, unknown = parser.parse_known_args(argv)
  if unknown:
    old = [u for u in unknown if u.startswith("--") and "_" in u]
    if old:
      name = old[0].split("=")[0]
      parser.error(f"unrecognized argument {name}: flags are spelled with "
                   f"dashes ({name.replace('_', '-')})")
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  return args, parser


def _pick(values: dict[str, Any], cls, prefix: str = "", skip=()):
  names = {f.name for f in dataclasses.fields(cls)} - set(skip)
  return {n: values[prefix + n] for n in names if prefix + n in values}


def resolve(args: argparse.Namespace,
            parser: argparse.ArgumentParser) -> Plan:
  """Merges preset and flags into validated configs; bad values exit(2)."""
  values = preset_values(args.preset)
  values.update({k: v for k, v in vars(args).items() if v is not None})
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
    if args.match_params and "full" in models:
      nsa_model = LMConfig(**_pick(values, LMConfig, skip=_MODEL_SKIP),
                           attention="nsa", nsa=nsa)
      models["full"] = match_mlp_hidden(models["full"],
                                        count_params(nsa_model))
    train_cfg = TrainConfig(**_pick(values, TrainConfig))
  except (ValueError, TypeError) as e:
    parser.error(str(e))
  if models[attentions[0]].vocab_size < tokenizer.VOCAB_SIZE:
    parser.error(f"--vocab-size must be >= {tokenizer.VOCAB_SIZE} (byte "
                 "tokens)")
  if values["data"] not in ("code", "passkey", "mqar"):
    parser.error(f"--data={values['data']!r} is not one of code, passkey, "
                 "mqar")
  if values["documents"] and values["data"] != "code":
    parser.error("--documents splits the packed code corpus into its files; "
                 f"--data={values['data']} has one document per row")
  if not 0 <= values["passkey_rows"] < train_cfg.batch_size:
    parser.error(f"--passkey-rows={values['passkey_rows']} must be in "
                 f"[0, batch_size={train_cfg.batch_size})")
  if not 0.0 < values["val_fraction"] < 1.0:
    parser.error(f"--val-fraction={values['val_fraction']} must be in (0, 1)")
  if args.resume_step is not None and args.resume_step < 0:
    parser.error(f"--resume-step={args.resume_step} must be >= 0")
  if args.fresh and args.resume_step is not None:
    parser.error("--fresh and --resume-step exclude each other")
  mode = ("fresh" if args.fresh else "resume"
          if args.resume or args.resume_step is not None else "auto")
  devices = device_flags.resolve(args, parser)
  if values["documents"] and devices.mesh is not None:
    parser.error("--documents is not supported with a device mesh (--mesh-*) "
                 "yet: the sharded attention does not carry segment ids")
  return Plan(
      preset=args.preset, models=models, train=train_cfg,
      data={k: values[k] for k in DATA_DEFAULTS},
      workdir=pathlib.Path(args.workdir or f"runs/{args.preset}"), mode=mode,
      resume_step=args.resume_step, plot=args.plot,
      debug_step_delay=args.debug_step_delay,
      devices=devices)
