"""CPU baseline: time and peak memory of NSA's XLA path vs dense attention.

Each (implementation, T) runs forward+backward in a fresh subprocess, so its
peak resident memory (``ru_maxrss``) is its own; a run over ``--mem-limit-gb``
is stopped and reported as such. Prints a Markdown table for BENCHMARKS.md.

  python experiments/bench_xla_cpu.py --seq-lens 4096 16384
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

IMPLS = ("xla", "reference", "dot_product_attention")


def _measure(impl, seq_len, heads, kv_heads, head_dim, repeats):
  """Runs in the child: compiles, then times forward+backward."""
  import resource  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from nsa_jax import NSAConfig  # pylint: disable=g-import-not-at-top
  from nsa_jax import ops  # pylint: disable=g-import-not-at-top

  config = NSAConfig.paper()
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  tc = config.num_compressed(seq_len)
  q = jax.random.normal(keys[0], (1, seq_len, heads, head_dim))
  k = jax.random.normal(keys[1], (1, seq_len, kv_heads, head_dim))
  v = jax.random.normal(keys[2], (1, seq_len, kv_heads, head_dim))
  k_cmp = jax.random.normal(keys[3], (1, tc, kv_heads, head_dim))
  v_cmp = jax.random.normal(keys[4], (1, tc, kv_heads, head_dim))
  gates = jax.nn.sigmoid(jax.random.normal(keys[5], (1, seq_len, heads, 3)))

  if impl == "dot_product_attention":
    def loss(q, k, v, k_cmp, v_cmp):
      del k_cmp, v_cmp
      return jax.nn.dot_product_attention(q, k, v, is_causal=True).sum()
  else:
    def loss(q, k, v, k_cmp, v_cmp):
      return ops.nsa_attention(q, k, v, gates, config, k_cmp=k_cmp,
                               v_cmp=v_cmp, impl=impl).sum()

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
  args = (q, k, v, k_cmp, v_cmp)
  start = time.perf_counter()
  jax.block_until_ready(step(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append(time.perf_counter() - start)
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(json.dumps(dict(impl=impl, seq_len=seq_len, seconds=min(times),
                        first_call_s=compile_s, peak_gb=peak_gb)))


def _run_child(args, impl, seq_len):
  """Runs one measurement in a subprocess, stopping it past the memory limit."""
  cmd = [sys.executable, __file__, "--child", impl, str(seq_len),
         "--heads", str(args.heads), "--kv-heads", str(args.kv_heads),
         "--head-dim", str(args.head_dim), "--repeats", str(args.repeats)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  limit_kb = args.mem_limit_gb * 2**20
  while proc.poll() is None:
    try:
      with open(f"/proc/{proc.pid}/status") as status:
        rss_kb = next(int(line.split()[1]) for line in status
                      if line.startswith("VmRSS"))
    except (FileNotFoundError, StopIteration):
      rss_kb = 0
    if rss_kb > limit_kb:
      proc.kill()
      proc.wait()
      return dict(impl=impl, seq_len=seq_len,
                  error=f"over {args.mem_limit_gb} GB, stopped")
    time.sleep(0.05)
  out, err = proc.communicate()
  if proc.returncode:
    last = (err.strip().splitlines() or ["?"])[-1]
    return dict(impl=impl, seq_len=seq_len, error=last[:120])
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   allow_abbrev=False)
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
  parser.add_argument("--impls", nargs="+", default=list(IMPLS),
                      choices=IMPLS)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=1)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--mem-limit-gb", type=float, default=18.0)
  parser.add_argument("--child", nargs=2, metavar=("IMPL", "T"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    _measure(args.child[0], int(args.child[1]), args.heads, args.kv_heads,
             args.head_dim, args.repeats)
    return
  print(f"B=1 Hq={args.heads} Hkv={args.kv_heads} Dk=Dv={args.head_dim} "
        f"fp32, NSAConfig.paper(), forward+backward, {os.cpu_count()} CPUs")
  rows = [_run_child(args, impl, t) for t in args.seq_lens
          for impl in args.impls]
  print("| T | impl | fwd+bwd s | peak RSS GB | time / xla time | "
        "memory / xla memory |")
  print("|---|---|---|---|---|---|")
  for t in args.seq_lens:
    base = next(r for r in rows if r["seq_len"] == t and r["impl"] == "xla")
    for row in (r for r in rows if r["seq_len"] == t):
      if "error" in row:
        print(f"| {t} | {row['impl']} | - | - | - | {row['error']} |")
        continue
      speed = mem = "1.00"
      if row is not base and "error" not in base:
        speed = f"{row['seconds'] / base['seconds']:.2f}"
        mem = f"{row['peak_gb'] / base['peak_gb']:.2f}"
      print(f"| {t} | {row['impl']} | {row['seconds']:.2f} | "
            f"{row['peak_gb']:.2f} | {speed} | {mem} |")


if __name__ == "__main__":
  main()
