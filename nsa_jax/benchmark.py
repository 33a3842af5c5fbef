"""GPU benchmarks of NSA against dense attention: timing, baselines, tables.

Used by ``experiments/bench_kernels.py`` and the kernels notebook. Every ratio
compares calls timed in one process on the same inputs. Times are medians
over ``reps`` repetitions of ``iters`` back-to-back calls of a jitted
function after a warm-up call (asynchronous dispatch keeps the GPU busy
between calls, so launch gaps stay out of the numbers).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import ops
from nsa_jax import selection
from nsa_jax.config import NSAConfig

# Forward+backward work of attention is about 3.5x its forward (the backward
# recomputes the scores and does four more matmuls of the same size).
FWD_BWD_FACTOR = 3.5


@dataclasses.dataclass(frozen=True)
class Shape:
  """Heads and head dims of one benchmark row (batch 1)."""

  hq: int
  hkv: int
  dk: int
  dv: int

  def __str__(self):
    return f"Hq {self.hq} / Hkv {self.hkv} / Dk {self.dk} / Dv {self.dv}"


def make_inputs(shape: Shape, seq_len: int, config: NSAConfig, dtype,
                seed: int = 0, batch: int = 1):
  """Random q, k, v, k_cmp, v_cmp [B, ., H, D] and gates [B, T, Hq, 3]."""
  ks = jax.random.split(jax.random.key(seed), 6)
  tc = config.num_compressed(seq_len)
  normal = lambda k, s: jax.random.normal(k, s, jnp.float32).astype(dtype)
  return dict(
      q=normal(ks[0], (batch, seq_len, shape.hq, shape.dk)),
      k=normal(ks[1], (batch, seq_len, shape.hkv, shape.dk)),
      v=normal(ks[2], (batch, seq_len, shape.hkv, shape.dv)),
      k_cmp=normal(ks[3], (batch, tc, shape.hkv, shape.dk)),
      v_cmp=normal(ks[4], (batch, tc, shape.hkv, shape.dv)),
      gates=jax.nn.sigmoid(normal(ks[5], (batch, seq_len, shape.hq, 3))))


def nsa_selection(x, config: NSAConfig):
  """(lse [B, T, Hq], block table [B, T, Hkv, n]) of NSA's own selection
  for inputs ``x`` (``make_inputs`` or a layer's branch inputs): the
  compressed branch's lse, then the Pallas block selection."""
  _, lse = ops.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"],
                                    block_size=config.cmp_block,
                                    stride=config.cmp_stride, impl="pallas")
  return lse, ops.select_blocks(x["q"], x["k_cmp"], lse, config,
                                impl="pallas")


def time_ms(fn, *args, iters: int = 5, reps: int = 3) -> float:
  """Median milliseconds per call of ``jax.jit(fn)(*args)``."""
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


def fwd_bwd(fn, argnums):
  """The gradient of a weighted sum of ``fn``'s (first) output."""
  def loss(*args):
    out = fn(*args)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(out.astype(jnp.float32)) * 1e-3
  return jax.grad(loss, argnums=argnums)


def measured_peak_tflops(size: int = 8192, dtype=jnp.bfloat16) -> float:
  """bf16 TFLOP/s of a ``size``^3 matmul on random data: the practical peak."""
  ka, kb = jax.random.split(jax.random.key(1))
  a = jax.random.normal(ka, (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (size, size), jnp.float32).astype(dtype)
  ms = time_ms(jnp.matmul, a, b, iters=10, reps=5)
  return 2 * size ** 3 / (ms * 1e-3) / 1e12


def _pad_v(q, k, v):
  """Pads V's head dim up to Dk (dense kernels refuse Dk != Dv)."""
  extra = k.shape[-1] - v.shape[-1]
  return v if extra <= 0 else jnp.pad(v, [(0, 0)] * 3 + [(0, extra)])


def dense_methods(shape: Shape, interpret: bool = False):
  """name -> f(q, k, v) of the dense causal baselines.

  With Dk != Dv, V is padded to Dk and the output sliced back: the baseline
  then does Dk/Dv more value work than it would need (say so in tables).
  """
  dv = shape.dv

  def cudnn(q, k, v):
    out = jax.nn.dot_product_attention(q, k, _pad_v(q, k, v), is_causal=True,
                                       implementation="cudnn")
    return out[..., :dv]

  def pallas_mha(q, k, v):
    from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
    group = shape.hq // shape.hkv
    k, v = jnp.repeat(k, group, 2), jnp.repeat(_pad_v(q, k, v), group, 2)
    return attention.mha(q, k, v, None, sm_scale=shape.dk ** -0.5,
                         causal=True, interpret=interpret)[..., :dv]

  return {"cudnn": cudnn, "pallas_mha": pallas_mha}


def nsa_method(config: NSAConfig, impl: str = "pallas"):
  """f(q, k, v, k_cmp, v_cmp, gates) -> out: all of NSA, gated."""
  return lambda q, k, v, kc, vc, g: ops.nsa_attention(
      q, k, v, g, config, k_cmp=kc, v_cmp=vc, impl=impl)


def run_sweep(shapes, seq_lens, config: NSAConfig, dtype, *, iters=5, reps=3,
              interpret=False, mha_bwd_max=32768, log=print):
  """NSA against each dense baseline, forward and forward+backward.

  Args:
    shapes: ``Shape`` rows.
    seq_lens: T values.
    config: NSA hyper-parameters.
    dtype: input dtype.
    iters, reps: timing repetitions (``time_ms``).
    interpret: Pallas interpret mode (CPU smoke runs only).
    mha_bwd_max: longest T at which the Pallas flash baseline's slow
      backward is timed.
    log: called with one line per timed row.

  Returns:
    A list of dicts (shape, seq_len, method, mode, ms, note); a method that
    refuses a shape has ms = nan and the error in note.
  """
  rows = []
  for shape in shapes:
    for seq_len in seq_lens:
      x = make_inputs(shape, seq_len, config, dtype)
      nsa_args = tuple(x[n] for n in ("q", "k", "v", "k_cmp", "v_cmp",
                                      "gates"))
      methods = {"nsa_pallas": (nsa_method(config), nsa_args, 5)}
      for name, fn in dense_methods(shape, interpret).items():
        methods[name] = (fn, nsa_args[:3], 3)
      for name, (fn, args, nargs) in methods.items():
        for mode in ("fwd", "fwd+bwd"):
          note = ""
          if (name == "pallas_mha" and mode == "fwd+bwd"
              and seq_len > mha_bwd_max):
            ms, note = math.nan, f"not timed above T={mha_bwd_max}"
          else:
            f = fn if mode == "fwd" else fwd_bwd(fn, tuple(range(nargs)))
            try:
              ms = time_ms(f, *args, iters=iters, reps=reps)
            except Exception as e:  # pylint: disable=broad-except
              ms, note = math.nan, "refused: " + (
                  str(e).splitlines() or [""])[0][:100]
          if name != "nsa_pallas" and shape.dk != shape.dv and not note:
            note = f"V padded to Dk={shape.dk}"
          rows.append(dict(shape=shape, seq_len=seq_len, method=name,
                           mode=mode, ms=ms, note=note))
          log(f"{shape} T={seq_len:>6} {name:>11} {mode:>7} {ms:10.3f} ms "
              f"{note}")
  return rows


def table_overlap(block_indices, positions_per_tile: int) -> dict[str, float]:
  """How much neighbouring queries share blocks.

  Args:
    block_indices: int32 [B, T, Hkv, n] (-1 empty).
    positions_per_tile: positions a query tile of the kernel holds.

  Returns:
    dict: ``blocks_per_query`` (mean non-empty slots), ``shared_with_prev``
    (mean fraction of a query's blocks its predecessor also picked),
    ``distinct_per_tile`` (mean distinct blocks per tile of
    ``positions_per_tile`` positions).
  """
  idx = np.asarray(block_indices)
  b, t, h, n = idx.shape
  used = idx >= 0
  prev = idx[:, :-1]
  same = (idx[:, 1:, :, :, None] == prev[:, :, :, None, :]).any(-1)
  shared = (same & used[:, 1:]).sum(-1) / np.maximum(used[:, 1:].sum(-1), 1)
  tiles = t // positions_per_tile
  grouped = idx[:, :tiles * positions_per_tile].reshape(
      b, tiles, positions_per_tile, h, n).transpose(0, 1, 3, 2, 4).reshape(
          b, tiles, h, positions_per_tile * n)
  grouped = np.sort(grouped, axis=-1)
  distinct = ((grouped[..., 1:] != grouped[..., :-1]) & (grouped[..., 1:] >= 0)
              ).sum(-1) + (grouped[..., 0] >= 0)
  return dict(blocks_per_query=float(used.sum(-1).mean()),
              shared_with_prev=float(shared.mean()),
              distinct_per_tile=float(distinct.mean()))


def speedup_table(rows) -> str:
  """Markdown: NSA time and each baseline's time over NSA's, per row."""
  lines = ["| shape | T | mode | NSA ms | baseline | baseline ms | "
           "NSA speed-up | note |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["method"] == "nsa_pallas":
      continue
    nsa = [x["ms"] for x in rows if x["method"] == "nsa_pallas" and
           x["shape"] == r["shape"] and x["seq_len"] == r["seq_len"] and
           x["mode"] == r["mode"]][0]
    lines.append(f"| {r['shape']} | {r['seq_len']} | {r['mode']} | "
                 f"{nsa:.2f} | {r['method']} | {r['ms']:.2f} | "
                 f"{r['ms'] / nsa:.2f}x | {r['note']} |")
  return "\n".join(lines)


def kernel_flops(shape: Shape, seq_len: int, config: NSAConfig):
  """Forward FLOPs each op must do (the keys each query reads, causal)."""
  t, tc = seq_len, config.num_compressed(seq_len)
  per_key = 2 * (shape.dk + shape.dv) * shape.hq * t
  return {
      "compressed_attention": per_key * tc / 2,
      "select_blocks": 2 * shape.dk * shape.hq * t * tc / 2,
      "selected_attention": per_key * min(
          config.num_selected * config.sel_block, t / 2),
      "sliding_window": per_key * min(config.window, t / 2),
  }


def profile_ops(shape: Shape, seq_len: int, config: NSAConfig, dtype, *,
                peak: float, iters=5, reps=3, log=print):
  """Where NSA's time goes: each op alone, forward and forward+backward.

  Returns:
    A list of dicts (op, mode, ms, tflops, percent_of_peak); TFLOP/s count
    the work the op must do (``kernel_flops``; x3.5 for forward+backward).
  """
  x = make_inputs(shape, seq_len, config, dtype)
  q, k, v, k_cmp, v_cmp, gates = (x[n] for n in (
      "q", "k", "v", "k_cmp", "v_cmp", "gates"))
  lse, idx = nsa_selection(x, config)
  flops = kernel_flops(shape, seq_len, config)
  cmp = lambda q, kc, vc: ops.compressed_attention(
      q, kc, vc, block_size=config.cmp_block, stride=config.cmp_stride,
      impl="pallas")
  # The block table is an argument, not a constant: XLA would constant-fold
  # the kernel's sort of it at compile time (seconds at 64k).
  slc = lambda q, k, v, idx: ops.selected_attention(
      q, k, v, idx, block_size=config.sel_block, impl="pallas")
  win = lambda q, k, v: ops.sliding_window_attention(
      q, k, v, window=config.window, impl="auto")
  sel = lambda q, kc, lse: ops.select_blocks(q, kc, lse, config,
                                             impl="pallas")
  xla_sel = lambda q, kc, lse: selection.top_n_blocks(
      ops.block_scores(q, kc, lse, config, impl="pallas"), config)
  cases = [
      ("compressed_attention", cmp, (q, k_cmp, v_cmp), (0, 1, 2)),
      ("select_blocks", sel, (q, k_cmp, lse), None),
      ("block_scores + XLA top_k", xla_sel, (q, k_cmp, lse), None),
      ("selected_attention", slc, (q, k, v, idx), (0, 1, 2)),
      ("sliding_window", win, (q, k, v), (0, 1, 2)),
      ("nsa_attention", nsa_method(config), (q, k, v, k_cmp, v_cmp, gates),
       (0, 1, 2, 3, 4)),
  ]
  rows = []
  for name, fn, args, argnums in cases:
    modes = ("fwd",) if argnums is None else ("fwd", "fwd+bwd")
    for mode in modes:
      f = fn if mode == "fwd" else fwd_bwd(fn, argnums)
      try:
        ms = time_ms(f, *args, iters=iters, reps=reps)
      except Exception as e:  # pylint: disable=broad-except
        log(f"{name} {mode}: failed: {str(e).splitlines()[0][:120]}")
        continue
      work = flops.get(name.split(" ")[0])
      tflops = None
      if work is not None:
        work *= 1 if mode == "fwd" else FWD_BWD_FACTOR
        tflops = work / (ms * 1e-3) / 1e12
      rows.append(dict(op=name, mode=mode, ms=ms, tflops=tflops,
                       percent_of_peak=None if tflops is None
                       else 100 * tflops / peak))
      rate = "" if tflops is None else (
          f" {tflops:6.1f} TFLOP/s ({100 * tflops / peak:4.1f}% of peak)")
      log(f"{name:>26} {mode:>7} {ms:9.3f} ms{rate}")
  return rows


def plot_speedups(rows, path: str, title: str):
  """Speed-up of NSA over each baseline against T, one line per series."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(8, 5))
  ax = fig.subplots()
  for shape in sorted({r["shape"] for r in rows}, key=str):
    for mode in ("fwd", "fwd+bwd"):
      for base in ("cudnn", "pallas_mha"):
        pts = []
        for seq_len in sorted({r["seq_len"] for r in rows}):
          pick = lambda m, t=seq_len: [
              x["ms"] for x in rows if x["shape"] == shape and
              x["seq_len"] == t and x["mode"] == mode and x["method"] == m]
          if pick(base) and pick("nsa_pallas") and not math.isnan(
              pick(base)[0]):
            pts.append((seq_len, pick(base)[0] / pick("nsa_pallas")[0]))
        if pts:
          ax.plot(*zip(*pts), marker="o",
                  linestyle="-" if mode == "fwd" else "--",
                  label=f"vs {base}, {mode}, {shape}")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sequence length T (tokens)")
  ax.set_ylabel("speed-up of NSA (baseline time / NSA time)")
  ax.set_title(title)
  ax.axhline(1.0, color="gray", lw=0.8)
  ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=150)


def load_rows(path: str):
  """Rows saved by ``save_rows`` (an absent file: none)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = json.load(f)
  for r in rows:
    r["shape"] = Shape(**r["shape"])
    r["ms"] = float(r["ms"])
  return rows


def save_rows(path: str, rows):
  """Merges ``rows`` into the JSON file at ``path``; returns all its rows.

  A row with the same (shape, T, method, mode) as a saved one replaces it,
  so runs of different shapes accumulate and a rerun updates.
  """
  key = lambda r: (str(r["shape"]), r["seq_len"], r["method"], r["mode"])
  merged = {key(r): r for r in load_rows(path)}
  merged.update({key(r): r for r in rows})
  with open(path, "w") as f:
    json.dump([dict(r, shape=dataclasses.asdict(r["shape"]))
               for r in merged.values()], f, indent=1)
  return list(merged.values())


# Launch candidates ``tune`` times per kernel: (rows, second tile, warps,
# stages), the table's format (``pallas_kernels.launch_config``); for the
# block-score kernel the second entry is unused (16 blocks per step).
# "compressed_fwd" times the compressed kernel's forward alone, for its own
# query tile (``launch_config._FWD_ROWS``).
TUNE_CANDIDATES = {
    "compressed": [(rows, block_k, warps, stages)
                   for rows in (64, 128) for block_k in (32, 64)
                   for warps in (4, 8) for stages in (2, 3)],
    "compressed_fwd": [(rows, block_k, warps, 2) for rows in (64, 128, 256)
                       for block_k in (64, 128) for warps in (4, 8)],
    "selected": [(rows, 64, warps, stages) for rows in (16, 32, 64)
                 for warps in (4, 8) for stages in (2, 3)],
    "block_scores": [(rows, 16, warps, stages) for rows in (64, 128)
                     for warps in (4, 8) for stages in (1, 2)],
}


def tune(shape: Shape, seq_len: int, config: NSAConfig, dtype, *,
         kernels=("compressed", "selected", "block_scores"), iters=3,
         reps=3, log=print):
  """Times each launch candidate (forward+backward where there is one).

  Returns:
    dict kernel -> (best ms, best candidate); the winners go into
    ``pallas_kernels/launch_config.py`` (and ``block_scores.default_launch``).
  """
  import pallas_kernels as pk  # pylint: disable=g-import-not-at-top
  from pallas_kernels import triton_compat as tc  # pylint: disable=g-import-not-at-top
  x = make_inputs(shape, seq_len, config, dtype)
  q, k, v, k_cmp, v_cmp = (x[n] for n in ("q", "k", "v", "k_cmp", "v_cmp"))
  lse, idx = nsa_selection(x, config)
  group_p = tc.next_pow2(shape.hq // shape.hkv)
  positions = lambda rows: max(1, rows // group_p)

  def candidate_fn(kernel, entry):
    rows, second, warps, stages = entry
    if kernel in ("compressed", "compressed_fwd"):
      f = lambda q, kc, vc: pk.compressed_attention(
          q, kc, vc, block_size=config.cmp_block, stride=config.cmp_stride,
          block_q=positions(rows), block_k=second, num_warps=warps,
          num_stages=stages)
      if kernel == "compressed_fwd":
        return f, (q, k_cmp, v_cmp)
      return fwd_bwd(f, (0, 1, 2)), (q, k_cmp, v_cmp)
    if kernel == "selected":
      f = lambda q, k, v, idx: pk.selected_attention(
          q, k, v, idx, block_size=config.sel_block, block_q=positions(rows),
          block_q_dkv=positions(second), num_warps=warps, num_stages=stages)
      return fwd_bwd(f, (0, 1, 2)), (q, k, v, idx)
    launch = pk.ScoreLaunch(block_q=positions(rows), num_warps=warps,
                            num_stages=stages)
    f = lambda q, kc, lse: pk.select_blocks(
        q, kc, lse, cmp_block=config.cmp_block, cmp_stride=config.cmp_stride,
        sel_block=config.sel_block, num_selected=config.num_selected,
        num_initial=config.num_initial, num_local=config.num_local,
        launch=launch)
    return f, (q, k_cmp, lse)

  best = {}
  for kernel in kernels:
    for entry in TUNE_CANDIDATES[kernel]:
      fn, args = candidate_fn(kernel, entry)
      try:
        ms = time_ms(fn, *args, iters=iters, reps=reps)
      except Exception as e:  # pylint: disable=broad-except
        log(f"{kernel} {entry}: failed: {str(e).splitlines()[0][:100]}")
        continue
      log(f"{kernel} {entry}: {ms:.3f} ms")
      if kernel not in best or ms < best[kernel][0]:
        best[kernel] = (ms, entry)
    if kernel in best:
      log(f"BEST {kernel} {shape} T={seq_len}: {best[kernel]}")
  return best
