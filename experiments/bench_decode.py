"""Per-token decode latency: NSA against dense decode over the same cache.

  python experiments/bench_decode.py                      # H100, issue 13
  python experiments/bench_decode.py --smoke              # CPU, tiny, XLA
  python experiments/bench_decode.py --profile            # + kernel times

Times the attention decode step (``nsa_jax.decode.nsa_decode``: Pallas
kernels for the compressed branch with its scores, the block selection, the
selected and the window branches; against jax's Pallas
``decode_attention.gqa``, cuDNN and XLA dense decode) at each context and
batch, per step of ``--steps`` chained steps in one jitted call, with the
bytes each step must read and the achieved fraction of the measured HBM
bandwidth; then one
``TransformerLM`` decode step (several layers) for NSA and full attention.
Rows go to ``--out`` (JSON) and a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import platform

from flax import nnx
import jax
import jax.numpy as jnp

from nsa_jax import NSAConfig
from nsa_jax.benchmark import Shape
from nsa_jax.decode import benchmark as bench
from nsa_jax.modules import LMConfig
from nsa_jax.modules import TransformerLM


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(
      description=__doc__, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--contexts", type=_ints,
                      default=[8192, 16384, 32768, 65536, 131072])
  parser.add_argument("--batches", type=_ints, default=[1, 16])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, XLA only: runs on a CPU")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--steps", type=int, default=8,
                      help="dependent decode steps per timed call (the "
                      "time per step excludes the host's dispatch)")
  parser.add_argument("--out", default="bench_decode.json")
  parser.add_argument("--model-layers", type=int, default=4)
  parser.add_argument("--plot", default="bench_decode.png",
                      help="PNG of latency against context ('' for none)")
  parser.add_argument("--profile", action="store_true",
                      help="also trace each NSA step and print its device "
                      "kernels, us per step")
  args = parser.parse_args(argv)
  print(f"python {platform.python_version()}, jax {jax.__version__}, "
        f"devices {jax.devices()}")
  if args.smoke:
    config = NSAConfig.tiny()
    shapes = [Shape(4, 2, 16, 16)]
    contexts, batches, dtype = [64, 128], [2], jnp.float32
    methods = lambda s: bench.decode_methods(s, config, impls=("xla",),
                                             dense=("xla",))
    peak = None
  else:
    config = NSAConfig.paper()
    shapes = [Shape(64, 4, 128, 128), Shape(32, 8, 128, 128)]
    contexts, batches, dtype = args.contexts, args.batches, jnp.bfloat16
    methods = None
    peak = bench.measured_peak_bandwidth()
    print(f"measured peak bandwidth {peak:.0f} GB/s")
  rows = bench.run_decode_sweep(shapes, contexts, batches, config, dtype,
                                methods=methods, iters=args.iters,
                                steps=args.steps,
                                peak_gbps=peak, profile=args.profile)
  print(bench.decode_table(rows))
  if args.profile:
    print(bench.kernel_table(rows))
  if args.plot:
    print(f"wrote {bench.plot_decode(rows, args.plot)}")
  model_rows = []
  for attention in ("nsa", "full"):
    lm = LMConfig(
        vocab_size=256, d_model=64 if args.smoke else 2048,
        num_layers=2 if args.smoke else args.model_layers,
        num_heads=shapes[0].hq, num_kv_heads=shapes[0].hkv,
        head_dim=shapes[0].dk, attention=attention, nsa=config,
        impl="xla" if args.smoke else "auto",
        dtype="float32" if args.smoke else "bfloat16")
    model = TransformerLM(lm, rngs=nnx.Rngs(0))
    for context in contexts:
      for batch in batches:
        ms = bench.time_model_decode(model, context, batch, iters=args.iters)
        print(f"TransformerLM {attention} ({lm.num_layers} layers) "
              f"T={context} B={batch}: {ms:.3f} ms a step, "
              f"{batch / (ms * 1e-3):.0f} tokens/s")
        model_rows.append(dict(attention=attention, layers=lm.num_layers,
                               context=context, batch=batch, ms=ms))
  with open(args.out, "w") as f:
    json.dump({"attention": rows, "model": model_rows, "peak_gbps": peak},
              f, indent=1)
  print(f"wrote {args.out}")
  return rows


if __name__ == "__main__":
  main()
