"""Selected attention on a trained NSA layer's block tables against random ones.

The selected kernel's cost depends on its block table only: how many
distinct blocks a query tile reads. Random inputs pick blocks that
neighbouring queries rarely share; a trained layer's picks overlap. This
script takes the tables layer ``--layer`` of the NSA model of a
``train_lm.py`` run picks on validation text (Python's standard library),
compares their overlap with the tables of random inputs, and times
``pallas_kernels.selected_attention`` forward and forward+backward with each,
on the same q/k/v, at two shapes:

- the model's own heads (its q, k, v);
- the paper's Hq 64 / Hkv 4 / D 128, random q/k/v, the table of kv head h
  taken from the trained table of (batch row h // Hkv_model, kv head
  h % Hkv_model): the kernel's work does not depend on the values.

``--tile-rows 16,32,64`` also times wider query tiles (more positions a
tile): trained tables overlap, so a wider tile reads fewer distinct blocks
per query.

  python experiments/bench_trained_tables.py --workdir runs/gpu-64k \
      --layer 3 --seq-len 65536 --out outputs/trained_tables

GPU only (the timings mean nothing in interpret mode).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib

import jax
import jax.numpy as jnp

from nsa_jax import benchmark
from nsa_jax import train
from nsa_jax.data import corpus as corpus_lib
from nsa_jax.data import iterators
import pallas_kernels
from pallas_kernels.triton_compat import next_pow2


def time_selected(q, k, v, block_indices, sel_block: int, iters: int,
                  reps: int, block_q: int | None = None
                  ) -> tuple[float, float]:
  """(forward ms, forward+backward ms) of the Pallas selected attention.

  ``block_q``: query positions per forward / dQ tile; None: the launch
  table's.
  """
  fn = lambda q, k, v, idx: pallas_kernels.selected_attention(
      q, k, v, idx, block_size=sel_block, block_q=block_q)
  fwd = benchmark.time_ms(fn, q, k, v, block_indices, iters=iters, reps=reps)
  both = benchmark.time_ms(benchmark.fwd_bwd(fn, (0, 1, 2)), q, k, v,
                           block_indices, iters=iters, reps=reps)
  return fwd, both


def trained_inputs(workdir: str, layer: int, seq_len: int, batch: int):
  """The branch inputs of one trained layer on ``batch`` validation windows."""
  (_, model), = train.runs.load_runs_or_exit(workdir, "nsa")
  attn = model.layers[layer].attn
  corpus = corpus_lib.build_corpus()
  tokens = iterators.eval_batches(corpus.val, batch, seq_len, 1)[0]["inputs"]
  x = model.attention_input(jnp.asarray(tokens), layer)
  return attn.config, attn.branch_inputs(x)


def tables(inputs, config):
  """The Pallas block table of q against the compressed keys of ``inputs``."""
  return benchmark.nsa_selection(inputs, config)[1]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   allow_abbrev=False)
  parser.add_argument("--workdir", required=True,
                      help="a train_lm.py run directory holding nsa/")
  parser.add_argument("--layer", type=int, default=0)
  parser.add_argument("--seq-len", type=int, default=65536)
  parser.add_argument("--tile-rows", default="16",
                      help="query rows (positions x padded group) per "
                      "forward / dQ tile, comma-separated; 16 is the "
                      "launch table's")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", default="outputs/trained_tables")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
  dtype = jnp.bfloat16
  paper = benchmark.Shape(64, 4, 128, 128)
  config, inputs = trained_inputs(args.workdir, args.layer, args.seq_len,
                                  batch=2)
  inputs = {name: x.astype(dtype) for name, x in inputs.items()}
  hkv = inputs["k"].shape[2]
  model_shape = benchmark.Shape(inputs["q"].shape[2], hkv,
                                inputs["q"].shape[3], inputs["v"].shape[3])
  trained = tables(inputs, config)
  random_model = tables(benchmark.make_inputs(model_shape, args.seq_len,
                                              config, dtype, batch=2), config)
  heads = trained.transpose(0, 2, 1, 3).reshape(-1, args.seq_len,
                                                config.num_selected)
  if heads.shape[0] < paper.hkv:
    raise SystemExit(f"error: {heads.shape[0]} trained tables, the paper "
                     f"shape needs {paper.hkv}")
  trained_paper = heads[:paper.hkv].transpose(1, 0, 2)[None]
  paper_inputs = benchmark.make_inputs(paper, args.seq_len, config, dtype)
  random_paper = tables(paper_inputs, config)

  rows = []
  cases = [
      ("model", model_shape, inputs, trained, random_model),
      ("paper", paper, paper_inputs, trained_paper, random_paper),
  ]
  tile_rows = [int(r) for r in args.tile_rows.split(",")]
  for name, shape, x, trained_idx, random_idx in cases:
    group_p = next_pow2(shape.hq // shape.hkv)
    tiles = sorted({max(1, r // group_p) for r in tile_rows})
    for tile, source in itertools.product(tiles, ("trained", "random")):
      idx = trained_idx if source == "trained" else random_idx
      overlap = benchmark.table_overlap(idx, tile)
      fwd, both = time_selected(x["q"], x["k"], x["v"], idx,
                                config.sel_block, args.iters, args.reps,
                                block_q=tile)
      row = dict(shape=str(shape), which=name, tables=source,
                 seq_len=args.seq_len, positions_per_tile=tile,
                 fwd_ms=fwd, fwd_bwd_ms=both, **overlap)
      rows.append(row)
      print(json.dumps(row), flush=True)
  print("\n| shape (query positions a tile) | tables | shared with previous "
        "query | distinct blocks per tile | fwd ms | fwd+bwd ms |\n"
        "|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['shape']} ({r['positions_per_tile']}) | "
          f"{r['tables']} | {100 * r['shared_with_prev']:.0f}% | "
          f"{r['distinct_per_tile']:.1f} | {r['fwd_ms']:.2f} | "
          f"{r['fwd_bwd_ms']:.2f} |")
  path = pathlib.Path(args.out) / "trained_tables.json"
  path.write_text(json.dumps(rows, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
