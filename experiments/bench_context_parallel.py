"""Context-parallel NSA: bytes each strategy moves, and the one-GPU check.

  python experiments/bench_context_parallel.py            # table (+ GPU part)
  python experiments/bench_context_parallel.py --hlo-lengths 131072
  python experiments/bench_context_parallel.py --no-gpu --out runs/cp

Table (any machine; 8 CPU devices are made for it): the bytes one device
receives per NSA layer at 128k-1M tokens for the paper's shape, per
strategy of ``nsa_jax.parallel`` and per part (compressed K/V, window halo,
selected K/V, requests), computed from the shapes (``comm.predict``) and
checked against the collectives of the compiled forward+backward program
on the CPU devices (``comm.hlo_collectives``). XLA's CPU backend runs bf16
collectives in float32, so the check compiles the float32 program and
compares its bytes with the float32 prediction; the table lists bf16.

GPU part (when jax has a GPU): on one device, the step of a train_lm-sized
LM through ``train.train_step`` against ``Parallelism`` on a one-device
mesh, and ``ops.nsa_attention`` forward+backward against
``sharded_nsa_attention`` on that mesh: the sharded path must not slow the
single-device step down. About 3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import time

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # before jax starts
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8"

# pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nsa_jax import benchmark  # noqa: E402
from nsa_jax import ops  # noqa: E402
from nsa_jax import parallel  # noqa: E402
from nsa_jax import train  # noqa: E402
from nsa_jax.config import NSAConfig  # noqa: E402
from nsa_jax.modules import LMConfig  # noqa: E402
from nsa_jax.modules import TransformerLM  # noqa: E402
from nsa_jax.parallel import comm  # noqa: E402

LENGTHS = (131072, 262144, 524288, 1048576)
# The paper's layer (Hq 64, Hkv 4, Dk 192, Dv 128), batch 1, bf16.
SHAPE = dict(batch=1, num_heads=64, num_kv_heads=4, head_dim=192,
             v_head_dim=128, config=NSAConfig.paper())
PARTS = ("compressed K/V", "window halo", "selected K/V", "requests",
         "q/k/v/gates/out")


def strategies(seq_len: int):
  """(shards, ContextParallel): 8 shards; "heads" at 4 (Hkv = 4)."""
  blocks_per_shard = seq_len // 8 // SHAPE["config"].sel_block
  return [(8, parallel.ContextParallel("allgather")),
          (8, parallel.ContextParallel("gather",
                                       capacity=blocks_per_shard // 8)),
          (4, parallel.ContextParallel("heads"))]


def _program_bytes(shape: comm.LayerShape, shards: int,
                   context: parallel.ContextParallel) -> dict[str, int]:
  """Bytes per kind in the compiled float32 forward+backward on CPUs."""
  c, t = shape.config, shape.seq_len
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  kv = lambda d: spec(shape.batch, t, shape.num_kv_heads, d)
  cmp = lambda d: spec(shape.batch, c.num_compressed(t), shape.num_kv_heads,
                       d)
  args = (spec(shape.batch, t, shape.num_heads, shape.head_dim),
          kv(shape.head_dim), kv(shape.v_head_dim),
          spec(shape.batch, t, shape.num_heads, 3), cmp(shape.head_dim),
          cmp(shape.v_head_dim), kv(shape.head_dim), kv(shape.v_head_dim))
  mesh = parallel.MeshConfig(sequence=shards).make(
      jax.devices("cpu")[:shards])

  def loss(q, k, v, g, kc, vc, kw, vw, weights):
    out = parallel.sharded_nsa_attention(
        q, k, v, g, c, k_cmp=kc, v_cmp=vc, k_win=kw, v_win=vw, impl="xla",
        mesh=mesh, context=context)
    # A cotangent that varies (a constant one lets XLA fold its transfers);
    # the output is returned, as a layer's is used.
    return jnp.sum(out * weights), out

  # Compiled for the CPU devices; the weights split over the sequence like
  # the output (replicated, they would let XLA slice them locally instead
  # of moving the output's cotangent).
  split = lambda *spec: jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*spec))
  grad = jax.jit(jax.grad(loss, argnums=tuple(range(8)), has_aux=True),
                 in_shardings=(split(),) * 8 + (split(None, "sequence"),))
  weights = spec(shape.batch, t, shape.num_heads, shape.v_head_dim)
  hlo = grad.lower(*args, weights).compile().as_text()
  return comm.received_by_kind(comm.hlo_collectives(hlo))


def table_rows(lengths, hlo_lengths):
  rows = []
  for seq_len in lengths:
    for shards, context in strategies(seq_len):
      bf16 = comm.LayerShape(seq_len=seq_len, itemsize=2, **SHAPE)
      parts = comm.predict(bf16, comm.Split(shards), context)
      both = comm.predict(bf16, comm.Split(shards), context, backward=True)
      row = {"strategy": context.strategy, "shards": shards,
             "capacity": (context.capacity if context.strategy == "gather"
                          else None),
             "seq_len": seq_len,
             "parts": {n: sum(k.values()) for n, k in parts.items()},
             "forward": sum(comm.total_by_kind(
                 parts, skip=("fallback K/V",)).values()),
             "forward_backward": sum(comm.total_by_kind(
                 both, skip=("fallback K/V",)).values()),
             "fallback": sum(parts.get("fallback K/V", {}).values()),
             "hlo_checked": None}
      if seq_len in hlo_lengths:
        start = time.perf_counter()
        f32 = comm.LayerShape(seq_len=seq_len, itemsize=4, **SHAPE)
        want = comm.total_by_kind(comm.predict(f32, comm.Split(shards),
                                               context, backward=True))
        got = _program_bytes(f32, shards, context)
        row["hlo_checked"] = got == want
        row["hlo_bytes"], row["predicted_bytes"] = got, want
        print(f"  HLO of {context.strategy} P={shards} T={seq_len}: "
              f"{'matches' if got == want else f'DIFFERS {got} != {want}'}"
              f" ({time.perf_counter() - start:.0f}s)", flush=True)
      rows.append(row)
  return rows


def _mb(n: int) -> str:
  return f"{n / 2**20:,.1f}"


def markdown(rows) -> str:
  lines = [
      "| strategy | P | T | " + " | ".join(PARTS) + " | forward | "
      "fwd+bwd | HLO check |",
      "|---" * (len(PARTS) + 6) + "|"]
  for r in rows:
    name = r["strategy"] + (f" (C={r['capacity']}; fallback +"
                            f"{_mb(r['fallback'])})" if r["capacity"] else "")
    check = {None: "-", True: "equal", False: "DIFFERS"}[r["hlo_checked"]]
    lines.append(
        f"| {name} | {r['shards']} | {r['seq_len'] // 1024}k | "
        + " | ".join(_mb(r["parts"][p]) if p in r["parts"] else "-"
                     for p in PARTS)
        + f" | {_mb(r['forward'])} | {_mb(r['forward_backward'])} | "
        f"{check} |")
  return "\n".join(lines)


def _time_steps(step, model, optimizer, batch, iters: int) -> float:
  """Median ms per train step (after a compiling call)."""
  jax.block_until_ready(step(model, optimizer, batch))
  times = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(iters):
      out = step(model, optimizer, batch)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) * 1e3 / iters)
  return statistics.median(times)


def gpu_check(seq_len: int, lm_seq_len: int, iters: int):
  """Single-device step against the sharded path on a one-GPU mesh."""
  gpu = jax.devices("gpu")[:1]
  mesh = parallel.MeshConfig().make(gpu)
  results = {}
  # One NSA layer: Hq 64 / Hkv 4 / D 128, paper config, bf16.
  config = NSAConfig.paper()
  shape = benchmark.Shape(64, 4, 128, 128)
  x = benchmark.make_inputs(shape, seq_len, config, jnp.bfloat16)
  args = (x["q"], x["k"], x["v"], x["gates"], x["k_cmp"], x["v_cmp"])
  single = lambda q, k, v, g, kc, vc: ops.nsa_attention(
      q, k, v, g, config, k_cmp=kc, v_cmp=vc)
  sharded = lambda q, k, v, g, kc, vc: parallel.sharded_nsa_attention(
      q, k, v, g, config, k_cmp=kc, v_cmp=vc, mesh=mesh)
  for name, fn in (("ops.nsa_attention", single),
                   ("sharded_nsa_attention, 1-GPU mesh", sharded)):
    ms = benchmark.time_ms(benchmark.fwd_bwd(fn, (0, 1, 2, 3, 4, 5)), *args)
    results[f"NSA fwd+bwd T={seq_len}: {name}"] = ms
    print(f"  {name}: {ms:.2f} ms fwd+bwd", flush=True)
  # A train_lm gpu-8k-sized LM (6 layers, d 512, bf16), batch 8.
  cfg = LMConfig(d_model=512, num_layers=6, num_heads=8, num_kv_heads=2,
                 head_dim=64, mlp_hidden=1536, dtype="bfloat16")
  tcfg = train.TrainConfig(steps=100, batch_size=8, seq_len=lm_seq_len)
  tokens = jax.random.randint(jax.random.key(0), (8, lm_seq_len), 0, 256)
  batch = {"inputs": tokens, "targets": tokens,
           "mask": jnp.ones((8, lm_seq_len), jnp.float32)}
  par = parallel.Parallelism(mesh)
  for name, step, shard in (("train.train_step", train.train_step, False),
                            ("Parallelism.train_step, 1-GPU mesh",
                             par.train_step, True)):
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, train.make_optimizer(tcfg),
                              wrt=nnx.Param)
    step_batch = batch
    if shard:
      par.shard(model)
      par.shard(optimizer)
      step_batch = par.put_batch(batch)
    ms = _time_steps(step, model, optimizer, step_batch, iters)
    results[f"LM step T={lm_seq_len} B=8: {name}"] = ms
    print(f"  {name}: {ms:.1f} ms/step", flush=True)
  return results


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
  parser.add_argument("--hlo-lengths", type=int, nargs="*", default=None,
                      help="lengths whose program is compiled and checked "
                      "(default: all of --lengths; none: no check)")
  parser.add_argument("--no-gpu", action="store_true",
                      help="skip the GPU part")
  parser.add_argument("--gpu-seq-len", type=int, default=32768)
  parser.add_argument("--lm-seq-len", type=int, default=8192)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--out", default=os.environ.get("OUT", "runs/cp"),
                      help="directory for context_parallel.{json,md}")
  args = parser.parse_args(argv)
  print(f"python {platform.python_version()}, jax {jax.__version__}, "
        f"devices {jax.devices()}", flush=True)
  hlo = args.lengths if args.hlo_lengths is None else args.hlo_lengths
  print("bytes one device receives per layer (MiB, bf16; paper shape, B=1)")
  rows = table_rows(args.lengths, set(hlo))
  table = markdown(rows)
  print(table)
  result = {"shape": {**SHAPE,
                      "config": dataclasses.asdict(SHAPE["config"])},
            "rows": rows}
  if not args.no_gpu and jax.default_backend() == "gpu":
    print(f"one GPU ({jax.devices()[0].device_kind}): single-device step "
          "against the sharded path", flush=True)
    result["gpu"] = gpu_check(args.gpu_seq_len, args.lm_seq_len, args.iters)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "context_parallel.json").write_text(json.dumps(result, indent=1))
  (out / "context_parallel.md").write_text(table + "\n")
  print(f"wrote {out / 'context_parallel.md'}")
  if any(r["hlo_checked"] is False for r in rows):
    raise SystemExit("the compiled program moves other bytes than computed")


if __name__ == "__main__":
  main()
