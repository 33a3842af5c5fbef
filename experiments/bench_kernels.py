"""Times NSA (Pallas kernels) against dense causal attention baselines on GPU.

  python experiments/bench_kernels.py             # full sweep, T = 8k .. 128k
  python experiments/bench_kernels.py --tune      # re-measure the launch table
  python experiments/bench_kernels.py --smoke     # tiny, CPU, interpret mode

Baselines: cuDNN fused attention (``jax.nn.dot_product_attention``), the
Pallas Triton flash attention of ``jax.experimental.pallas.ops.gpu``, and
tokamax when importable. A baseline that refuses a shape is reported, not
fatal. Prints a table, per-kernel TFLOP/s and GB/s against the device peak,
and writes ``speedup_vs_t.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nsa_jax import ops
from nsa_jax.config import NSAConfig
import pallas_kernels as pk
from pallas_kernels import launch_config

# (name, dense bf16 TFLOP/s, HBM TB/s) by device_kind substring.
_PEAKS = [("H200", 989.0, 4.8), ("H100", 989.0, 3.35), ("A100", 312.0, 2.0),
          ("L4", 121.0, 0.3), ("T4", 65.0, 0.32)]


@dataclasses.dataclass(frozen=True)
class Shape:
  hq: int
  hkv: int
  dk: int
  dv: int


def _peaks():
  kind = jax.devices()[0].device_kind
  for name, tflops, tbs in _PEAKS:
    if name in kind:
      return kind, tflops, tbs
  return kind, float("nan"), float("nan")


def _time(fn, args, iters):
  """Median wall time of a jitted call in ms (after one compile+warm-up)."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def _inputs(shape, seq_len, config, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  tc = config.num_compressed(seq_len)
  normal = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(dtype)
  q = normal(ks[0], (1, seq_len, shape.hq, shape.dk))
  k = normal(ks[1], (1, seq_len, shape.hkv, shape.dk))
  v = normal(ks[2], (1, seq_len, shape.hkv, shape.dv))
  k_cmp = normal(ks[3], (1, tc, shape.hkv, shape.dk))
  v_cmp = normal(ks[4], (1, tc, shape.hkv, shape.dv))
  gates = jax.nn.sigmoid(normal(ks[5], (1, seq_len, shape.hq, 3)))
  return q, k, v, k_cmp, v_cmp, gates


def _with_backward(fn):
  """fwd+bwd: gradient of sum(out) w.r.t. every differentiable input."""
  def loss(*args):
    return jnp.sum(fn(*args).astype(jnp.float32))
  return jax.grad(loss, argnums=tuple(range(3)))


def _methods(shape, config, interpret):
  """name -> f(q, k, v, k_cmp, v_cmp, gates) -> out; q, k, v first."""
  nsa = lambda q, k, v, kc, vc, g: ops.nsa_attention(
      q, k, v, g, config, k_cmp=kc, v_cmp=vc, impl="pallas")
  cudnn = lambda q, k, v, *_: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn")

  def pallas_mha(q, k, v, *_):
    from jax.experimental.pallas.ops.gpu import attention
    group = shape.hq // shape.hkv
    k, v = jnp.repeat(k, group, 2), jnp.repeat(v, group, 2)
    return attention.mha(q, k, v, None, sm_scale=shape.dk ** -0.5,
                         causal=True, interpret=interpret)

  methods = {"nsa_pallas": nsa, "cudnn": cudnn, "pallas_mha": pallas_mha}
  try:
    import tokamax
    methods["tokamax"] = lambda q, k, v, *_: tokamax.dot_product_attention(
        q, k, v, is_causal=True)
  except ImportError:
    pass
  return methods


def _nsa_flops(shape, seq_len, config):
  """Forward FLOPs actually computed by the three NSA branches."""
  per_key = 2 * (shape.dk + shape.dv) * shape.hq * seq_len
  cmp_keys = config.num_compressed(seq_len) / 2
  slc_keys = min(config.num_selected * config.sel_block, seq_len / 2)
  win_keys = min(config.window, seq_len / 2)
  return per_key * (cmp_keys + slc_keys + win_keys)


def _dense_flops(shape, seq_len):
  return 2 * (shape.dk + shape.dv) * shape.hq * seq_len * seq_len / 2


def _kernel_costs(shape, seq_len, config, itemsize):
  """Per-kernel (forward FLOPs, HBM bytes) for achieved-rate reporting."""
  t, hq, hkv, dk, dv = seq_len, shape.hq, shape.hkv, shape.dk, shape.dv
  tc = config.num_compressed(seq_len)
  qo = t * hq * (dk + dv) * itemsize
  slc_keys = config.num_selected * config.sel_block
  win_keys = min(config.window, t)
  return {
      "compressed": (2 * (dk + dv) * hq * t * tc / 2,
                     qo + tc * hkv * (dk + dv) * itemsize),
      "block_scores": (2 * dk * hq * t * tc / 2,
                       t * hq * dk * itemsize + tc * hkv * dk * itemsize),
      # Every (position, kv head) gathers its n blocks of K and V.
      "selected": (2 * (dk + dv) * hq * t * slc_keys,
                   qo + t * hkv * slc_keys * (dk + dv) * itemsize),
      "window": (2 * (dk + dv) * hq * t * win_keys,
                 qo + t * hkv * (dk + dv) * itemsize),
  }


def _kernels(shape, config, interpret, launch=None):
  """name -> f(q, k, v, k_cmp, v_cmp, lse, idx) of each NSA kernel alone."""
  kw = {} if launch is None else dataclasses.asdict(launch)
  return {
      "compressed": lambda q, k, v, kc, vc, lse, idx: pk.compressed_attention(
          q, kc, vc, block_size=config.cmp_block, stride=config.cmp_stride,
          interpret=interpret, **kw)[0],
      "block_scores": lambda q, k, v, kc, vc, lse, idx: pk.block_scores(
          q, kc, lse, cmp_block=config.cmp_block,
          cmp_stride=config.cmp_stride, sel_block=config.sel_block,
          interpret=interpret, **kw),
      "selected": lambda q, k, v, kc, vc, lse, idx: pk.selected_attention(
          q, k, v, idx, block_size=config.sel_block, interpret=interpret,
          **kw),
      "window": lambda q, k, v, kc, vc, lse, idx: pk.sliding_window_attention(
          q, k, v, window=config.window, interpret=interpret,
          implementation="pallas", **kw),
  }


def _kernel_args(shape, seq_len, config, dtype):
  q, k, v, k_cmp, v_cmp, _ = _inputs(shape, seq_len, config, dtype)
  _, lse = ops.compressed_attention(q, k_cmp, v_cmp,
                                    block_size=config.cmp_block,
                                    stride=config.cmp_stride, impl="xla")
  idx = ops.select_blocks(q, k_cmp, lse, config, impl="xla")
  return q, k, v, k_cmp, v_cmp, lse, idx


def run_sweep(shapes, seq_lens, config, dtype, iters, interpret):
  """Times every method at every (shape, T, mode); returns result rows."""
  rows = []
  for shape in shapes:
    for seq_len in seq_lens:
      args = _inputs(shape, seq_len, config, dtype)
      for name, fn in _methods(shape, config, interpret).items():
        for mode in ("fwd", "fwd+bwd"):
          f = fn if mode == "fwd" else _with_backward(fn)
          try:
            ms = _time(f, args, iters)
            note = ""
          except Exception as e:
            ms, note = float("nan"), f"refused: {type(e).__name__}: " + (
                str(e).splitlines() or [""])[0][:80]
          rows.append(dict(shape=shape, seq_len=seq_len, method=name,
                           mode=mode, ms=ms, note=note))
          print(f"{shape} T={seq_len:>6} {name:>11} {mode:>7} "
                f"{ms:10.3f} ms {note}", flush=True)
  return rows


def print_table(rows, config):
  print("\n| Hq/Hkv/Dk/Dv | T | mode | method | ms | TFLOP/s (useful) | "
        "speed-up of NSA | note |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    s = r["shape"]
    nsa = [x["ms"] for x in rows if x["shape"] == s and x["method"] ==
           "nsa_pallas" and x["seq_len"] == r["seq_len"]
           and x["mode"] == r["mode"]][0]
    flops = (_nsa_flops(s, r["seq_len"], config) if r["method"] ==
             "nsa_pallas" else _dense_flops(s, r["seq_len"]))
    flops *= 1 if r["mode"] == "fwd" else 3.5  # bwd ~ 2.5x fwd
    tflops = flops / (r["ms"] * 1e-3) / 1e12
    print(f"| {s.hq}/{s.hkv}/{s.dk}/{s.dv} | {r['seq_len']} | {r['mode']} | "
          f"{r['method']} | {r['ms']:.3f} | {tflops:.1f} | "
          f"{r['ms'] / nsa:.2f}x | {r['note']} |")


def report_kernels(shapes, seq_lens, config, dtype, iters, interpret):
  """Achieved TFLOP/s and GB/s of each NSA kernel's forward vs the peak."""
  kind, peak_tflops, peak_tbs = _peaks()
  print(f"\nPer-kernel forward on {kind} (peak {peak_tflops} TFLOP/s, "
        f"{peak_tbs} TB/s)")
  print("| shape | T | kernel | ms | TFLOP/s | % peak | GB/s | % peak |")
  print("|---|---|---|---|---|---|---|---|")
  itemsize = jnp.dtype(dtype).itemsize
  for shape in shapes:
    for seq_len in seq_lens:
      args = _kernel_args(shape, seq_len, config, dtype)
      costs = _kernel_costs(shape, seq_len, config, itemsize)
      for name, fn in _kernels(shape, config, interpret).items():
        ms = _time(fn, args, iters)
        flops, nbytes = costs[name]
        tflops = flops / (ms * 1e-3) / 1e12
        gbs = nbytes / (ms * 1e-3) / 1e9
        print(f"| {shape.hq}/{shape.hkv}/{shape.dk}/{shape.dv} | {seq_len} | "
              f"{name} | {ms:.3f} | {tflops:.1f} | "
              f"{100 * tflops / peak_tflops:.0f}% | {gbs:.0f} | "
              f"{100 * gbs / (peak_tbs * 1e3):.0f}% |")


def tune(shapes, seq_len, config, dtype, iters, interpret):
  """Times every launch candidate per kernel and prints the best per shape.

  Copy the winners into ``pallas_kernels/launch_config.py``'s table (keyed by
  padded head dim) and drop the PROVISIONAL note for measured buckets.
  """
  for shape in shapes:
    args = _kernel_args(shape, seq_len, config, dtype)
    group = shape.hq // shape.hkv
    for kernel, name in (("compressed", "compressed"),
                         ("block_scores", "block_scores"),
                         ("selected", "selected")):
      best = None
      for entry in launch_config.CANDIDATES[kernel]:
        launch = launch_config.make_config(
            entry, group=group, seq_len=seq_len,
            num_keys=config.num_compressed(seq_len),
            block_k_in_rows=kernel == "selected")
        fn = _kernels(shape, config, interpret, launch)[name]
        try:
          ms = _time(fn, args, iters)
        except Exception as e:
          print(f"  {kernel} {entry}: failed ({type(e).__name__})")
          continue
        print(f"  {kernel} {shape} {entry}: {ms:.3f} ms", flush=True)
        if best is None or ms < best[0]:
          best = (ms, entry)
      print(f"BEST {kernel} head_dim={max(shape.dk, shape.dv)} "
            f"G={group}: {best}")


def plot(rows, path):
  """Speed-up of NSA over each baseline against T, one line per baseline."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for shape in sorted({r["shape"] for r in rows}, key=str):
    for mode in ("fwd", "fwd+bwd"):
      for base in ("cudnn", "pallas_mha", "tokamax"):
        pts = []
        for seq_len in sorted({r["seq_len"] for r in rows}):
          pick = lambda m: [x["ms"] for x in rows if x["shape"] == shape and
                            x["seq_len"] == seq_len and x["mode"] == mode and
                            x["method"] == m]
          if pick(base) and not math.isnan(pick(base)[0]):
            pts.append((seq_len, pick(base)[0] / pick("nsa_pallas")[0]))
        if pts:
          ax.plot(*zip(*pts), marker="o", label=(
              f"vs {base}, {mode}, Hq={shape.hq} Hkv={shape.hkv} "
              f"Dk={shape.dk} Dv={shape.dv}"))
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sequence length T (tokens)")
  ax.set_ylabel("speed-up of NSA (baseline time / NSA time)")
  ax.set_title(f"NSA Pallas vs dense causal attention on "
               f"{jax.devices()[0].device_kind}")
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=150)
  print(f"wrote {path}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shape on CPU in interpret mode")
  parser.add_argument("--tune", action="store_true",
                      help="time every launch candidate (GPU)")
  parser.add_argument("--seq-lens", type=int, nargs="*",
                      default=[8192, 16384, 32768, 65536, 131072])
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--out", default="outputs/bench_kernels")
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  if args.smoke:
    # Dk == Dv and T a power of two so the Pallas flash baseline runs too.
    shapes = [Shape(hq=4, hkv=2, dk=16, dv=16)]
    seq_lens, config, dtype, iters = [32], NSAConfig.tiny(), jnp.float32, 1
    interpret = True
  else:
    shapes = [Shape(64, 4, 192, 128), Shape(32, 8, 128, 128)]
    seq_lens, config, dtype = args.seq_lens, NSAConfig.paper(), jnp.bfloat16
    iters, interpret = args.iters, False
  os.makedirs(args.out, exist_ok=True)
  if args.tune:
    tune(shapes, seq_lens[len(seq_lens) // 2], config, dtype, iters,
         interpret)
    return
  rows = run_sweep(shapes, seq_lens, config, dtype, iters, interpret)
  print_table(rows, config)
  report_kernels(shapes, seq_lens, config, dtype, iters, interpret)
  plot(rows, os.path.join(args.out, "speedup_vs_t.png"))


if __name__ == "__main__":
  main()
