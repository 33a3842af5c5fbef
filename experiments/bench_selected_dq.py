"""The selected kernel's two dQ passes, timed on the same inputs.

For each case (B x T, Hq / Hkv / D): the forward, and forward+backward with
dQ from the dQ kernel and from the dK/dV pass
(``selected_attention(dq_from_blocks=False / True)``), bf16, block tables
picked by NSA's own selection from random inputs, plus the size of the
shares buffer and the largest difference between the two dQs. Prints a
markdown table (BENCHMARKS.md, "dQ from the dK/dV pass").

  PYTHONPATH=. python experiments/bench_selected_dq.py
  PYTHONPATH=. python experiments/bench_selected_dq.py --cases 4x16384:8/2/64
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from nsa_jax import benchmark
from nsa_jax.config import NSAConfig
from pallas_kernels.selected_attention import selected_attention

DEFAULT_CASES = ("4x16384:8/2/64,2x32768:8/2/64,1x65536:8/2/64,"
                 "1x16384:32/8/128,1x16384:64/4/128")


def parse_case(text: str):
  """'BxT:Hq/Hkv/D' -> (batch, seq_len, Shape)."""
  sizes, heads = text.split(":")
  batch, seq_len = (int(x) for x in sizes.split("x"))
  hq, hkv, dim = (int(x) for x in heads.split("/"))
  return batch, seq_len, benchmark.Shape(hq, hkv, dim, dim)


def measure(batch: int, seq_len: int, shape, config: NSAConfig, *,
            iters: int, reps: int, dtype=jnp.bfloat16) -> dict:
  """Times and dQ difference of one case."""
  x = benchmark.make_inputs(shape, seq_len, config, dtype, batch=batch)
  q, k, v = x["q"], x["k"], x["v"]
  idx = benchmark.nsa_selection(x, config)[1]

  def attend(q, k, v, idx, dq_from_blocks=None):
    return selected_attention(q, k, v, idx, block_size=config.sel_block,
                              dq_from_blocks=dq_from_blocks)

  row = dict(batch=batch, seq_len=seq_len, shape=shape,
             fwd=benchmark.time_ms(attend, q, k, v, idx, iters=iters,
                                   reps=reps))
  dq = {}
  for from_blocks in (False, True):
    # All three gradients: with dQ alone XLA drops the unused dK/dV kernel
    # from the dQ-kernel path, which a training step never does.
    grad = benchmark.fwd_bwd(
        lambda q, k, v, idx, f=from_blocks: attend(q, k, v, idx, f),
        (0, 1, 2))
    row[from_blocks] = benchmark.time_ms(grad, q, k, v, idx, iters=iters,
                                         reps=reps)
    dq[from_blocks] = jax.jit(grad)(q, k, v, idx)[0].astype(jnp.float32)
  # The block-major forward (experimental), alone and with block-major dQ.
  blocks = lambda q, k, v, idx: selected_attention(  # noqa: E731
      q, k, v, idx, block_size=config.sel_block, fwd_from_blocks=True,
      dq_from_blocks=True)
  row["fwd_blocks"] = benchmark.time_ms(blocks, q, k, v, idx, iters=iters,
                                        reps=reps)
  row["all_blocks"] = benchmark.time_ms(
      benchmark.fwd_bwd(blocks, (0, 1, 2)), q, k, v, idx, iters=iters,
      reps=reps)
  row["max_diff"] = float(jnp.max(jnp.abs(dq[True] - dq[False])))
  row["max_dq"] = float(jnp.max(jnp.abs(dq[False])))
  row["buffer_gb"] = (batch * seq_len * shape.hq * config.num_selected
                      * shape.dk * jnp.dtype(dtype).itemsize / 1e9)
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
  print("| shape | B x T | forward ms | fwd+bwd, dQ kernel | fwd+bwd, dQ "
        "from blocks | shares buffer | max dQ difference (max dQ) | "
        "block-major forward | block-major fwd+bwd |")
  print("|---|---|---|---|---|---|---|---|---|")
  rows = []
  for case in args.cases.split(","):
    batch, seq_len, shape = parse_case(case)
    row = measure(batch, seq_len, shape, config, iters=args.iters,
                  reps=args.reps)
    rows.append(row)
    print(f"| {shape} | {batch} x {seq_len} | {row['fwd']:.2f} | "
          f"{row[False]:.2f} | {row[True]:.2f} | {row['buffer_gb']:.1f} GB | "
          f"{row['max_diff']:.2g} ({row['max_dq']:.2g}) | "
          f"{row['fwd_blocks']:.2f} | {row['all_blocks']:.2f} |", flush=True)
  return rows


if __name__ == "__main__":
  main()
