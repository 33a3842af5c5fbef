"""Where NSA's time goes on a GPU: each op alone, forward and forward+backward.

  python experiments/profile_ops.py --seq-len 65536 --hq 64 --hkv 4
  python experiments/profile_ops.py --sweep       # launch variants per kernel

Every row is timed in this one process on the same inputs as cuDNN's dense
causal attention, so the ratios compare like with like. Times are medians of
``--reps`` repetitions of ``--iters`` back-to-back calls (asynchronous
dispatch keeps the GPU busy between calls).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from nsa_jax import ops
from nsa_jax import selection
from nsa_jax.config import NSAConfig
import pallas_kernels as pk
from pallas_kernels.block_scores import ScoreLaunch

# Practical bf16 peak of an H100 SXM (an 8192^3 matmul, PALLAS_TRITON.md).
PEAK_TFLOPS = 790.0


def time_ms(fn, *args, iters=10, reps=5):
  """Median milliseconds per call of ``jax.jit(fn)`` after a warm-up."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / iters)
  return statistics.median(times)


def grad_of(fn, argnums):
  """fwd+bwd of ``fn``: the gradient of a weighted sum of its output."""
  def loss(*args):
    out = fn(*args)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(out.astype(jnp.float32) * 1e-3)
  return jax.grad(loss, argnums=argnums)


@dataclasses.dataclass(frozen=True)
class Problem:
  seq_len: int
  hq: int
  hkv: int
  dk: int
  dv: int
  dtype: str

  def inputs(self, config, seed=0):
    dtype = jnp.dtype(self.dtype)
    ks = jax.random.split(jax.random.key(seed), 6)
    tc = config.num_compressed(self.seq_len)
    normal = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(dtype)
    t = self.seq_len
    return dict(
        q=normal(ks[0], (1, t, self.hq, self.dk)),
        k=normal(ks[1], (1, t, self.hkv, self.dk)),
        v=normal(ks[2], (1, t, self.hkv, self.dv)),
        k_cmp=normal(ks[3], (1, tc, self.hkv, self.dk)),
        v_cmp=normal(ks[4], (1, tc, self.hkv, self.dv)),
        gates=jax.nn.sigmoid(normal(ks[5], (1, t, self.hq, 3))))


def flops(p: Problem, config: NSAConfig):
  """Forward FLOPs each op must do (causal, the keys each query reads)."""
  t, tc = p.seq_len, config.num_compressed(p.seq_len)
  per_key = 2 * (p.dk + p.dv) * p.hq * t
  slc = min(config.num_selected * config.sel_block, t / 2)
  return {
      "compressed": per_key * tc / 2,
      "select": 2 * p.dk * p.hq * t * tc / 2,
      "selected": per_key * slc,
      "window": per_key * min(config.window, t / 2),
      "dense": per_key * t / 2,
  }


def profile(p: Problem, config: NSAConfig, iters: int, reps: int):
  """Times each op; returns rows (name, mode, ms, TFLOP/s or None)."""
  x = p.inputs(config)
  q, k, v, k_cmp, v_cmp, gates = (x[n] for n in (
      "q", "k", "v", "k_cmp", "v_cmp", "gates"))
  _, lse = ops.compressed_attention(q, k_cmp, v_cmp,
                                    block_size=config.cmp_block,
                                    stride=config.cmp_stride, impl="pallas")
  idx = ops.select_blocks(q, k_cmp, lse, config, impl="pallas")
  fl = flops(p, config)
  rows = []

  def add(name, mode, fn, args, work=None):
    try:
      ms = time_ms(fn, *args, iters=iters, reps=reps)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name:>28} {mode:>8} failed: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}", flush=True)
      return
    rate = None if work is None else work / (ms * 1e-3) / 1e12
    rows.append((name, mode, ms, rate))
    extra = "" if rate is None else (
        f" {rate:7.1f} TFLOP/s {100 * rate / PEAK_TFLOPS:5.1f}% of peak")
    print(f"{name:>28} {mode:>8} {ms:9.3f} ms{extra}", flush=True)

  cmp = lambda q, kc, vc: ops.compressed_attention(
      q, kc, vc, block_size=config.cmp_block, stride=config.cmp_stride,
      impl="pallas")
  add("compressed_attention", "fwd", cmp, (q, k_cmp, v_cmp),
      fl["compressed"])
  add("compressed_attention", "fwd+bwd", grad_of(cmp, (0, 1, 2)),
      (q, k_cmp, v_cmp), 3.5 * fl["compressed"])
  add("select_blocks (pallas)", "fwd",
      lambda q, kc, lse: ops.select_blocks(q, kc, lse, config,
                                           impl="pallas"),
      (q, k_cmp, lse), fl["select"])
  add("block_scores kernel+top_k", "fwd",
      lambda q, kc, lse: selection.top_n_blocks(
          pk.block_scores(q, kc, lse, cmp_block=config.cmp_block,
                          cmp_stride=config.cmp_stride,
                          sel_block=config.sel_block), config),
      (q, k_cmp, lse), fl["select"])
  slc = lambda q, k, v: ops.selected_attention(
      q, k, v, idx, block_size=config.sel_block, impl="pallas")
  add("selected_attention", "fwd", slc, (q, k, v), fl["selected"])
  add("selected_attention", "fwd+bwd", grad_of(slc, (0, 1, 2)), (q, k, v),
      3.5 * fl["selected"])
  for impl in ("pallas", "auto"):
    win = lambda q, k, v, impl=impl: (
        pk.sliding_window_attention(q, k, v, window=config.window,
                                    implementation="pallas")
        if impl == "pallas" else ops.sliding_window_attention(
            q, k, v, window=config.window, impl="auto"))
    add(f"sliding_window ({impl})", "fwd", win, (q, k, v), fl["window"])
    add(f"sliding_window ({impl})", "fwd+bwd", grad_of(win, (0, 1, 2)),
        (q, k, v), 3.5 * fl["window"])
  nsa = lambda q, k, v, kc, vc, g: ops.nsa_attention(
      q, k, v, g, config, k_cmp=kc, v_cmp=vc, impl="pallas")
  args = (q, k, v, k_cmp, v_cmp, gates)
  add("nsa_attention", "fwd", nsa, args)
  add("nsa_attention", "fwd+bwd", grad_of(nsa, (0, 1, 2, 3, 4)), args)
  if p.dk == p.dv:
    dense = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")
    add("cudnn causal", "fwd", dense, (q, k, v), fl["dense"])
    add("cudnn causal", "fwd+bwd", grad_of(dense, (0, 1, 2)), (q, k, v),
        3.5 * fl["dense"])
  return rows


def sweep(p: Problem, config: NSAConfig, iters: int, reps: int):
  """Times launch variants of the block-score and compressed kernels."""
  x = p.inputs(config)
  q, k_cmp, v_cmp = x["q"], x["k_cmp"], x["v_cmp"]
  _, lse = ops.compressed_attention(q, k_cmp, v_cmp,
                                    block_size=config.cmp_block,
                                    stride=config.cmp_stride, impl="pallas")
  group = p.hq // p.hkv
  for rows in (64, 128, 256):
    for warps in (4, 8):
      for stages in (1, 2):
        block_q = max(1, rows // pk.triton_compat.next_pow2(group))
        launch = ScoreLaunch(block_q=block_q, num_warps=warps,
                             num_stages=stages)
        fn = lambda q, kc, lse, launch=launch: pk.select_blocks(
            q, kc, lse, cmp_block=config.cmp_block,
            cmp_stride=config.cmp_stride, sel_block=config.sel_block,
            num_selected=config.num_selected,
            num_initial=config.num_initial, num_local=config.num_local,
            launch=launch)
        try:
          ms = time_ms(fn, q, k_cmp, lse, iters=iters, reps=reps)
          print(f"select rows={rows} warps={warps} stages={stages}: "
                f"{ms:.3f} ms", flush=True)
        except Exception as e:  # pylint: disable=broad-except
          print(f"select rows={rows} warps={warps} stages={stages}: failed "
                f"{type(e).__name__}: {str(e).splitlines()[0][:100]}")
  for rows in (64, 128):
    for block_k in (32, 64):
      for warps in (4, 8):
        for stages in (2,):
          block_q = max(1, rows // pk.triton_compat.next_pow2(group))
          fn = lambda q, kc, vc, bq=block_q, bk=block_k, w=warps, s=stages: (
              pk.compressed_attention(
                  q, kc, vc, block_size=config.cmp_block,
                  stride=config.cmp_stride, block_q=bq, block_k=bk,
                  num_warps=w, num_stages=s))
          try:
            fwd = time_ms(fn, q, k_cmp, v_cmp, iters=iters, reps=reps)
            both = time_ms(grad_of(fn, (0, 1, 2)), q, k_cmp, v_cmp,
                           iters=iters, reps=reps)
            print(f"compressed rows={rows} block_k={block_k} warps={warps} "
                  f"stages={stages}: fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms",
                  flush=True)
          except Exception as e:  # pylint: disable=broad-except
            print(f"compressed rows={rows} block_k={block_k} warps={warps} "
                  f"stages={stages}: failed {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:100]}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-len", type=int, default=65536)
  parser.add_argument("--hq", type=int, default=64)
  parser.add_argument("--hkv", type=int, default=4)
  parser.add_argument("--dk", type=int, default=128)
  parser.add_argument("--dv", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--sweep", action="store_true",
                      help="time launch variants instead of the op table")
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
  p = Problem(args.seq_len, args.hq, args.hkv, args.dk, args.dv, args.dtype)
  print(p, flush=True)
  if args.sweep:
    sweep(p, NSAConfig.paper(), args.iters, args.reps)
  else:
    profile(p, NSAConfig.paper(), args.iters, args.reps)


if __name__ == "__main__":
  main()
