"""Plots the keys NSA shows each query, on real text: Python's own source.

Reads the first ``--seq-len`` bytes of the standard library's
``collections/__init__.py`` and saves ``nsa_jax.viz.plot_selection`` of an
NSAAttention layer's selection, window and compression branches on them:
by default a randomly initialised layer on the bytes' embeddings; with
``--workdir`` layer ``--layer`` of the NSA model ``train_lm.py`` trained
there (its newest good checkpoint), fed by the layers below it.

  python experiments/demo_selection.py --out outputs/selection.png
  python experiments/demo_selection.py --workdir runs/gpu-8k --layer 3 \
      --seq-len 4096 --out outputs/selection_gpu-8k.png
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import time

import matplotlib

matplotlib.use("Agg")

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax
from flax import nnx
import jax
import jax.numpy as jnp

import nsa_jax
from nsa_jax import NSAConfig
from nsa_jax import train
from nsa_jax import viz
from nsa_jax.modules import NSAAttention

# Paper ratios (l = 2d, l' = 2l) at a quarter of the block sizes: 16 blocks of
# 32 keys for T = 512, of which 6 are selected (1 initial, 2 local, 3 free).
DEMO_CONFIG = NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32,
                        num_selected=6, num_initial=1, num_local=2, window=64)
D_MODEL, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 64, 4, 1, 16


def source_bytes(seq_len: int) -> tuple[jax.Array, str]:
  """The first ``seq_len`` bytes of collections/__init__.py as int32 [1, T]."""
  path = os.path.join(sysconfig.get_paths()["stdlib"], "collections",
                      "__init__.py")
  with open(path, "rb") as f:
    data = f.read(seq_len)
  if len(data) < seq_len:
    raise ValueError(f"{path} has only {len(data)} bytes, asked {seq_len}")
  return jnp.frombuffer(data, jnp.uint8).astype(jnp.int32)[None], path


def random_layer(tokens, seed: int):
  """A random NSAAttention layer (DEMO_CONFIG) and the tokens' embeddings."""
  rngs = nnx.Rngs(seed)
  embed = nnx.Embed(256, D_MODEL, rngs=rngs)
  layer = NSAAttention(D_MODEL, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM,
                       config=DEMO_CONFIG, rngs=rngs)
  return layer, embed(tokens), f"random init, seed {seed}"


def trained_layer(tokens, workdir: str, index: int):
  """Layer ``index`` of the NSA model trained in ``workdir``, and its input."""
  (_, model), = train.runs.load_runs_or_exit(workdir, "nsa")
  if model.config.vocab_size != 256:
    raise SystemExit(f"error: {workdir}/nsa is not a byte-level model "
                     f"(vocab {model.config.vocab_size})")
  x = model.attention_input(tokens, index)
  return model.layers[index].attn, x, f"trained: {workdir}, layer {index}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   allow_abbrev=False)
  parser.add_argument("--out", default="outputs/selection.png")
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--kv-head", type=int, default=0)
  parser.add_argument("--workdir", default=None,
                      help="a train_lm.py run directory: show its NSA model")
  parser.add_argument("--layer", type=int, default=0,
                      help="with --workdir: which layer of the model")
  args = parser.parse_args()
  print(f"nsa_jax {nsa_jax.__version__}, jax {jax.__version__}, flax "
        f"{flax.__version__}, devices {jax.devices()}")

  start = time.perf_counter()
  tokens, path = source_bytes(args.seq_len)  # [1, T]
  if args.workdir is None:
    layer, x, what = random_layer(tokens, args.seed)
  else:
    layer, x, what = trained_layer(tokens, args.workdir, args.layer)
  config = layer.config
  viz.plot_selection(
      layer, x, kv_head=args.kv_head, path=args.out,
      title=(f"NSA ({what}) on the first {args.seq_len} bytes of "
             f"collections/__init__.py\nl={config.cmp_block}, "
             f"d={config.cmp_stride}, l'={config.sel_block}, "
             f"n={config.num_selected} ({config.num_initial} "
             f"initial, {config.num_local} local), "
             f"w={config.window}; kv head {args.kv_head}"))
  print(f"read {args.seq_len} bytes of {path}")
  print(f"saved {args.out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main()
