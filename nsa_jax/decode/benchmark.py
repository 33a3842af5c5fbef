"""Decode benchmarks: NSA decode against dense decode over the same cache.

Used by ``experiments/bench_decode.py``. A timed call runs ``steps``
dependent decode steps in one jitted function (each step's query depends on
the previous step's output, as in a generation loop, so nothing is hoisted
or merged); the time per step is the call's median time over ``steps``.
One step per call would time the host's dispatch of the call (about 50-100
us on the H100 machine with a cache pytree argument), not the GPU. Bytes
are those a step must read from the KV cache (queries, outputs and the
block table are negligible): NSA reads the visible compressed tokens, its n
selected blocks and the window; dense decode reads every cached key and
value.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp

from nsa_jax import profiling
from nsa_jax.benchmark import Shape
from nsa_jax.benchmark import time_ms
from nsa_jax.config import NSAConfig
from nsa_jax.decode import attention as attn_lib
from nsa_jax.decode import cache as cache_lib


def nsa_bytes(shape: Shape, context: int, config: NSAConfig, batch: int,
              itemsize: int) -> int:
  """Cache bytes one NSA decode step reads at ``context`` tokens."""
  per_token = shape.hkv * (shape.dk + shape.dv) * itemsize
  tokens = (config.num_compressed(context)
            + min(config.num_selected * config.sel_block, context)
            + min(config.window, context))
  return batch * tokens * per_token


def dense_bytes(shape: Shape, context: int, batch: int, itemsize: int) -> int:
  """Cache bytes one dense decode step reads at ``context`` tokens."""
  return batch * context * shape.hkv * (shape.dk + shape.dv) * itemsize


def measured_peak_bandwidth(num_bytes: int = 2 << 30) -> float:
  """GB/s of an elementwise pass over ``num_bytes`` (read + write)."""
  x = jnp.zeros((num_bytes // 4,), jnp.float32)
  ms = time_ms(lambda a: a + 1.0, x, iters=10, reps=5)
  return 2 * num_bytes / (ms * 1e-3) / 1e9


def random_nsa_cache(shape: Shape, context: int, config: NSAConfig, batch: int,
                     dtype, seed: int = 0) -> cache_lib.NSACache:
  """An NSACache holding ``context`` random tokens per row (own window K/V)."""
  cache = cache_lib.NSACache.create(batch, context, config, shape.hkv,
                                    shape.dk, shape.dv, dtype=dtype)
  leaves, treedef = jax.tree.flatten(cache)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating) else x
            for k, x in zip(keys, leaves)]
  cache = jax.tree.unflatten(treedef, leaves)
  return cache.replace(lengths=jnp.full((batch,), context, jnp.int32))


def decode_methods(shape: Shape, config: NSAConfig, *, impls=("pallas",),
                   dense=("pallas_decode", "cudnn", "xla")):
  """name -> (fn(q, gates, cache), kind) of the timed decode steps.

  ``q`` is [B, Hq, Dk], ``gates`` [B, Hq, 3]; NSA methods read an NSACache,
  dense ones its raw k, v (the same cache, ``lengths`` tokens a row).
  """
  methods = {}
  for impl in impls:
    methods[f"nsa_{impl}"] = (
        lambda q, g, c, impl=impl: attn_lib.nsa_decode(
            q[:, None], g[:, None], c, config, impl=impl)[:, 0], "nsa")
  return {**methods, **dense_decode_methods(dense)}


def dense_decode_methods(dense=("pallas_decode", "cudnn", "xla")):
  """name -> (fn(q, gates, cache), "dense") of dense decode baselines.

  Each reads ``cache.k``, ``cache.v`` and ``cache.lengths`` of any cache
  that has them (NSACache, FullCache, the SeerAttention-R cache); ``gates``
  is ignored. Names: "pallas_decode" (jax's Pallas GQA decode kernel, GPU),
  "cudnn" (GPU) and "xla".
  """

  def pallas_decode(q, g, c):
    del g
    from jax.experimental.pallas.ops.gpu import decode_attention  # pylint: disable=g-import-not-at-top
    return decode_attention.gqa(q, c.k, c.v, kv_seq_len=c.lengths,
                                k_splits=16)

  def cudnn(q, g, c):
    del g
    return jax.nn.dot_product_attention(
        q[:, None], c.k, c.v, key_value_seq_lengths=c.lengths,
        implementation="cudnn")[:, 0]

  def xla(q, g, c):
    del g
    full = cache_lib.FullCache(k=c.k, v=c.v, lengths=c.lengths,
                               max_length=c.k.shape[1])
    return attn_lib.full_decode(q[:, None], full)[:, 0]

  table = {"pallas_decode": pallas_decode, "cudnn": cudnn, "xla": xla}
  return {f"dense_{name}": (table[name], "dense") for name in dense}


def chained(fn, steps: int):
  """``fn(q, *rest)`` run ``steps`` times, each query ``q`` nudged by the
  previous output (``q + 1e-3 * out``, out cut or zero-padded to q's last
  axis), so the steps cannot be merged or hoisted. The nudge is elementwise,
  so XLA fuses it into the next step's first ops instead of timing a
  reduction of its own."""

  def run(q, *rest):
    out = fn(q, *rest)
    for _ in range(steps - 1):
      extra = q.shape[-1] - out.shape[-1]
      nudge = (out[..., :q.shape[-1]] if extra <= 0 else
               jnp.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, extra)]))
      q = q + (nudge * 1e-3).astype(q.dtype)
      out = fn(q, *rest)
    return out

  return run


def run_decode_sweep(shapes, contexts, batches, config: NSAConfig, dtype, *,
                     methods=None, iters: int = 20, reps: int = 3,
                     steps: int = 8, peak_gbps: float | None = None,
                     profile: bool = False, log=print):
  """Times every method at every (shape, context, batch).

  Args:
    shapes: Shape rows (Dk == Dv for the dense baselines).
    contexts: cached tokens per row.
    batches: batch sizes.
    config: NSA hyper-parameters.
    dtype: of the cache and queries.
    methods: dict as ``decode_methods`` gives, per shape: a function
      shape -> methods (default ``decode_methods(shape, config)``).
    iters, reps: timing repetitions.
    steps: decode steps per timed call (``chained``); 1 times each call.
    peak_gbps: measured bandwidth for the fraction column (None: omitted).
    profile: also trace each NSA method's chained call and keep its device
      kernels' us per step (``nsa_jax.profiling``; empty without device
      tracks, as on a CPU).
    log: progress printer.

  Returns:
    list of row dicts: shape, context, batch, method, ms, bytes, gbps,
    peak_fraction (or None), error (a failed method's message, ms None) and
    kernels_us (kernel name -> us per step; only with ``profile``).
  """
  itemsize = jnp.dtype(dtype).itemsize
  rows = []
  for shape in shapes:
    table = (methods or (lambda s: decode_methods(s, config)))(shape)
    for context in contexts:
      for batch in batches:
        cache = random_nsa_cache(shape, context, config, batch, dtype)
        ks = jax.random.split(jax.random.key(context + batch), 2)
        q = jax.random.normal(ks[0], (batch, shape.hq, shape.dk)).astype(dtype)
        gates = jax.nn.sigmoid(jax.random.normal(ks[1], (batch, shape.hq, 3)))
        for name, (fn, kind) in table.items():
          num = (nsa_bytes(shape, context, config, batch, itemsize)
                 if kind == "nsa" else
                 dense_bytes(shape, context, batch, itemsize))
          row = dict(shape=dataclasses.asdict(shape), context=context,
                     batch=batch, method=name, bytes=num, ms=None, gbps=None,
                     peak_fraction=None, error=None)
          try:
            ms = time_ms(chained(fn, steps), q, gates, cache, iters=iters,
                         reps=reps) / steps
            if profile and kind == "nsa":
              kernels = profiling.profile_kernels(
                  jax.jit(chained(fn, steps)), q, gates, cache)
              row["kernels_us"] = {k: v / steps for k, v in kernels.items()}
          except Exception as e:  # pylint: disable=broad-except
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            log(f"{shape} T={context} B={batch} {name}: {row['error']}")
            rows.append(row)
            continue
          gbps = num / (ms * 1e-3) / 1e9
          row.update(ms=ms, gbps=gbps, peak_fraction=(
              gbps / peak_gbps if peak_gbps else None))
          log(f"{shape} T={context} B={batch} {name}: {ms:.3f} ms, "
              f"{gbps:.0f} GB/s")
          rows.append(row)
        del cache
  return rows


def decode_table(rows) -> str:
  """Markdown: one line per (shape, context, batch), NSA against dense."""
  groups = {}
  for r in rows:
    key = (str(Shape(**r["shape"])), r["context"], r["batch"])
    groups.setdefault(key, {})[r["method"]] = r
  lines = ["| shape | context | batch | best NSA ms | best dense ms (method) "
           "| speedup | NSA GB/s (of peak) | NSA tokens/s |",
           "|---|---|---|---|---|---|---|---|"]
  for (shape, context, batch), got in groups.items():
    timed = {m: r for m, r in got.items() if r["ms"] is not None}
    nsa = [r for m, r in timed.items() if m.startswith("nsa")]
    dense = [r for m, r in timed.items() if m.startswith("dense")]
    if not nsa or not dense:
      continue
    best_nsa = min(nsa, key=lambda r: r["ms"])
    best_dense = min(dense, key=lambda r: r["ms"])
    frac = (f" ({best_nsa['peak_fraction']:.0%})"
            if best_nsa["peak_fraction"] else "")
    lines.append(
        f"| {shape} | {context} | {batch} | {best_nsa['ms']:.3f} | "
        f"{best_dense['ms']:.3f} ({best_dense['method']}) | "
        f"{best_dense['ms'] / best_nsa['ms']:.1f}x | "
        f"{best_nsa['gbps']:.0f}{frac} | "
        f"{batch / (best_nsa['ms'] * 1e-3):.0f} |")
  return "\n".join(lines)


def kernel_table(rows, floor: float = 0.5) -> str:
  """Markdown: the device kernels of each profiled row, us per step; those
  under ``floor`` us summed into one "others" line."""
  lines = ["| shape | context | batch | method | kernel | us per step |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    kernels = r.get("kernels_us", {})
    head = (f"| {Shape(**r['shape'])} | {r['context']} | {r['batch']} | "
            f"{r['method']} |")
    small = [us for us in kernels.values() if us < floor]
    for name, us in kernels.items():
      if us >= floor:
        lines.append(f"{head} {name[:60]} | {us:.1f} |")
    if small:
      lines.append(f"{head} {len(small)} others under {floor} us | "
                   f"{sum(small):.1f} |")
    if kernels:
      lines.append(f"{head} all | {sum(kernels.values()):.1f} |")
  if len(lines) == 2:
    return "no device kernels traced (a CPU backend has no device track)"
  return "\n".join(lines)


def plot_decode(rows, path: str, title: str = "decode latency"):
  """Per-token latency against context, one panel per (shape, batch).

  Args:
    rows: from ``run_decode_sweep``.
    path: PNG to write.
    title: figure title.

  Returns:
    ``path``.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = sorted({(str(Shape(**r["shape"])), r["batch"]) for r in rows})
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4),
                           squeeze=False)
  for ax, (shape, batch) in zip(axes[0], panels):
    mine = [r for r in rows if r["ms"] is not None and r["batch"] == batch
            and str(Shape(**r["shape"])) == shape]
    for method in sorted({r["method"] for r in mine}):
      points = sorted((r["context"], r["ms"]) for r in mine
                      if r["method"] == method)
      ax.plot(*zip(*points), marker="o",
              linestyle="-" if method.startswith("nsa") else "--",
              label=method)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)",
           ylabel="ms per decode step", title=f"{shape}, batch {batch}")
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def time_model_decode(model, context: int, batch: int, *, iters: int = 10,
                      reps: int = 3) -> float:
  """ms of one TransformerLM decode step with about ``context`` cached tokens.

  The caches are donated and fed back, as in a generation loop, so a step
  updates them in place instead of copying every layer's cache; the context
  grows by one token a step (``iters * reps + 1`` in all, negligible).
  """
  steps = iters * reps + 1
  caches = model.init_cache(batch, context + steps)
  caches = tuple(c.replace(lengths=jnp.full((batch,), context, jnp.int32))
                 for c in caches)
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(2,))
  def step(state, tokens, caches):
    return nnx.merge(graphdef, state).decode_step(tokens, caches)

  tokens = jnp.zeros((batch, 1), jnp.int32)
  logits, caches = step(state, tokens, caches)  # compiles
  jax.block_until_ready(logits)
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(iters):
      logits, caches = step(state, tokens, caches)
    jax.block_until_ready(logits)
    times.append((time.perf_counter() - start) * 1e3 / iters)
  return statistics.median(times)
