"""Continues a prompt with an LM trained by ``train_lm.py``; prints tokens/s.

  python experiments/generate.py --workdir runs/cpu-demo --prompt "def main("
  python experiments/generate.py --workdir runs/gpu-8k --attention nsa,full \\
      --max-new-tokens 512 --batch 16 --temperature 0.8 --top-p 0.95

For each attention type in ``--workdir`` it loads the newest good checkpoint,
generates ``--max-new-tokens`` bytes after the prompt for ``--batch`` copies
of it (``nsa_jax.decode.generate``: prefill, then a jit-compiled decode
loop), prints the first row's text and the speed of a second, compiled call.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import time

import jax
import numpy as np

from nsa_jax import decode
from nsa_jax import train as train_lib
from nsa_jax.data import tokenizer


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
  return value


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
  parser = argparse.ArgumentParser(
      description=__doc__, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="runs/cpu-demo")
  parser.add_argument("--attention", default="nsa")
  parser.add_argument("--prompt", default="def ")
  parser.add_argument("--max-new-tokens", type=_positive, default=128)
  parser.add_argument("--batch", type=_positive, default=1,
                      help="copies of the prompt decoded together")
  parser.add_argument("--temperature", type=float, default=0.0,
                      help="0: greedy")
  parser.add_argument("--top-k", type=_positive, default=None)
  parser.add_argument("--top-p", type=float, default=None)
  parser.add_argument("--stop", default="",
                      help="stop bytes, e.g. '\\n' (escapes are decoded)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  try:
    sampling = decode.SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  except ValueError as e:
    parser.error(str(e))
  prompt = tokenizer.encode(args.prompt).astype(np.int32)
  if not prompt.size:
    parser.error("--prompt must not be empty")
  stop = tuple(tokenizer.encode(args.stop.encode().decode("unicode_escape")))
  prompts = np.tile(prompt[None], (args.batch, 1))
  print(f"python {platform.python_version()}, jax {jax.__version__}, "
        f"devices {jax.devices()}")
  workdir = pathlib.Path(args.workdir)
  results = {}
  for name, model in train_lib.runs.load_runs_or_exit(workdir,
                                                       args.attention):
    run = lambda: decode.generate(
        model, prompts, max_new_tokens=args.max_new_tokens,
        sampling=sampling, seed=args.seed, stop_tokens=stop)
    start = time.perf_counter()
    jax.block_until_ready(run())  # compiles
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(run())
    seconds = time.perf_counter() - start
    count = np.asarray(out.num_generated)
    tokens = np.asarray(out.tokens)
    text = tokenizer.decode(tokens[0, :count[0]])
    speed = count.sum() / seconds
    print(f"\n{name}: {args.prompt!r} ->\n{args.prompt}{text}")
    print(f"{name}: {count.sum()} tokens ({args.batch} rows) in "
          f"{seconds:.3f} s: {speed:.1f} tokens/s, "
          f"{1e3 * seconds / max(1, count.max()):.2f} ms a step "
          f"(first call {compile_s:.1f} s with compilation)")
    results[name] = dict(text=text, tokens=tokens, tokens_per_s=speed)
  return results


if __name__ == "__main__":
  main()
