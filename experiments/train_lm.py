"""Trains NSA and full-attention LMs side by side; see ``--help``.

The presets, flags and run logic live in ``nsa_jax.train`` (``cli``,
``presets``, ``runs``); this script only connects them.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

import jax

from nsa_jax import train


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
  args, parser = train.cli.parse(argv)
  plan = train.cli.resolve(args, parser)
  plan.devices.initialize()  # --distributed: join the other hosts first
  print(f"python {platform.python_version()}, jax {jax.__version__}, "
        f"devices {jax.devices()}")
  print(f"preset {plan.preset}: {plan.train}")
  model = next(iter(plan.models.values()))
  try:
    parallel = plan.devices.parallelism(
        batch_size=plan.train.micro_batch_size, seq_len=plan.train.seq_len,
        num_heads=model.num_heads, num_kv_heads=model.num_kv_heads)
  except ValueError as e:
    parser.error(str(e))
  if parallel is not None:
    print(f"sharded over {parallel}")
  try:
    return train.runs.run_plan(plan, parallel=parallel)
  except (train.CheckpointError, train.runs.RunRefused) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from None


if __name__ == "__main__":
  main()
