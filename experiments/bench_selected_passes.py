"""The selected kernel's query-tile and block-major passes, timed together.

For each case (B x T, Hq / Hkv / D), on the same inputs: the forward by
the query-tile kernel and block-major (``selected_attention(
fwd_from_blocks=False / True)``), and forward+backward with both passes
query-tile, with dQ from the dK/dV pass, and with both block-major
(``dq_from_blocks``), bf16, block tables picked by NSA's own selection
from random inputs. Also the largest output and dQ differences between
the paths, the size of the per-(query, slot) buffers and the query chunks
the block-major passes take for them (``launch_config.selected_chunks``).
Prints a markdown table (BENCHMARKS.md, "Block-major forward at small
groups").

  PYTHONPATH=. python experiments/bench_selected_passes.py
  PYTHONPATH=. python experiments/bench_selected_passes.py \
      --cases 4x16384:8/2/64
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from nsa_jax import benchmark
from nsa_jax.config import NSAConfig
from pallas_kernels import launch_config
from pallas_kernels.selected_attention import selected_attention

DEFAULT_CASES = ("4x16384:8/2/64,2x32768:8/2/64,1x65536:8/2/64,"
                 "1x16384:32/8/128,1x65536:32/8/128,1x16384:64/4/128")
# (forward block-major, dQ from blocks) of the forward+backward columns.
PATHS = {"tiles": (False, False), "dq_blocks": (False, True),
         "blocks": (True, True)}


def parse_case(text: str):
  """'BxT:Hq/Hkv/D' -> (batch, seq_len, Shape)."""
  sizes, heads = text.split(":")
  batch, seq_len = (int(x) for x in sizes.split("x"))
  hq, hkv, dim = (int(x) for x in heads.split("/"))
  return batch, seq_len, benchmark.Shape(hq, hkv, dim, dim)


def _max_diff(a, b) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32)
                               - b.astype(jnp.float32))))


def measure(batch: int, seq_len: int, shape, config: NSAConfig, *,
            iters: int, reps: int, dtype=jnp.bfloat16) -> dict:
  """Times (ms), differences and buffer sizes (GB) of one case."""
  x = benchmark.make_inputs(shape, seq_len, config, dtype, batch=batch)
  q, k, v = x["q"], x["k"], x["v"]
  idx = benchmark.nsa_selection(x, config)[1]

  def path(fwd_blocks, dq_blocks):
    return lambda q, k, v, idx: selected_attention(
        q, k, v, idx, block_size=config.sel_block,
        fwd_from_blocks=fwd_blocks, dq_from_blocks=dq_blocks)

  time = lambda fn: benchmark.time_ms(fn, q, k, v, idx, iters=iters,  # noqa: E731
                                      reps=reps)
  row = dict(batch=batch, seq_len=seq_len, shape=shape,
             fwd_tiles=time(path(False, False)),
             fwd_blocks=time(path(True, True)))
  outs = {}
  for name, flags in PATHS.items():
    # All three gradients: with dQ alone XLA drops the unused dK/dV kernel
    # from the dQ-kernel path, which a training step never does.
    grad = benchmark.fwd_bwd(path(*flags), (0, 1, 2))
    row[name] = time(grad)
    outs[name] = (jax.jit(path(*flags))(q, k, v, idx),
                  jax.jit(grad)(q, k, v, idx)[0])
  row["out_diff"] = _max_diff(outs["blocks"][0], outs["tiles"][0])
  row["max_out"] = float(jnp.max(jnp.abs(outs["tiles"][0])))
  row["dq_diff"] = max(_max_diff(outs[n][1], outs["tiles"][1])
                       for n in ("dq_blocks", "blocks"))
  row["max_dq"] = float(jnp.max(jnp.abs(outs["tiles"][1])))
  buffer = lambda dim, forward: launch_config.selected_parts_bytes(  # noqa: E731
      slots=batch * seq_len * shape.hq * config.num_selected, dim=dim,
      itemsize=jnp.dtype(dtype).itemsize, forward=forward)
  for name, dim, forward in (("dq", shape.dk, False), ("fwd", shape.dv, True)):
    row[f"{name}_buffer_gb"] = buffer(dim, forward) / 1e9
    row[f"{name}_chunks"] = launch_config.selected_chunks(buffer(dim, forward))
  return row


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=DEFAULT_CASES,
                      help="comma-separated BxT:Hq/Hkv/D")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args(argv)
  config = NSAConfig.paper()
  print(f"device: {jax.devices()[0].device_kind}")
  print("| shape | B x T | forward: query tiles | forward: block-major | "
        "fwd+bwd: query tiles | fwd+bwd: dQ from blocks | fwd+bwd: "
        "block-major | buffers (chunks) fwd / dQ | max out diff (max out) | "
        "max dQ diff (max dQ) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  rows = []
  for case in args.cases.split(","):
    batch, seq_len, shape = parse_case(case)
    row = measure(batch, seq_len, shape, config, iters=args.iters,
                  reps=args.reps)
    rows.append(row)
    print(f"| {shape} | {batch} x {seq_len} | {row['fwd_tiles']:.2f} | "
          f"{row['fwd_blocks']:.2f} | {row['tiles']:.2f} | "
          f"{row['dq_blocks']:.2f} | {row['blocks']:.2f} | "
          f"{row['fwd_buffer_gb']:.1f} ({row['fwd_chunks']}) / "
          f"{row['dq_buffer_gb']:.1f} ({row['dq_chunks']}) GB | "
          f"{row['out_diff']:.2g} ({row['max_out']:.2g}) | "
          f"{row['dq_diff']:.2g} ({row['max_dq']:.2g}) |", flush=True)
  return rows


if __name__ == "__main__":
  main()
