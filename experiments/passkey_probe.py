"""Small CPU probe of how fast an LM learns passkey retrieval.

  python experiments/passkey_probe.py --attention full --phases 400:256
  python experiments/passkey_probe.py --phases 300:128,150:256 --const-tokens

Trains the cpu-demo model shape (``--num-layers`` blocks) from scratch, in
memory, through phases ``STEPS:T[:code]``: passkey examples of T tokens
(``code``: the stdlib code corpus, every token scored). Every
``--eval-every`` steps it prints the train loss, the key-digit loss of 16
held-out examples and the passkey accuracy; at the end the share of each
key digit predicted per length and depth (``nsa_jax.train.passkey_hits``),
and with ``--plot`` a heatmap of the whole-key accuracy (length x depth).
No checkpoints; for real runs use ``train_lm.py --data passkey``.
"""

from __future__ import annotations

import argparse
import time

from flax import nnx
import jax.numpy as jnp
import numpy as np

from nsa_jax import data
from nsa_jax import train
from nsa_jax.config import NSAConfig
from nsa_jax.modules.transformer import LMConfig
from nsa_jax.modules.transformer import TransformerLM

_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _phases(text: str) -> list[tuple[int, int, str]]:
  out = []
  for part in text.split(","):
    fields = part.split(":")
    kind = fields[2] if len(fields) == 3 else "passkey"
    if len(fields) not in (2, 3) or kind not in ("passkey", "code"):
      raise argparse.ArgumentTypeError(
          f"a phase is STEPS:T or STEPS:T:code, got {part!r}")
    out.append((int(fields[0]), int(fields[1]), kind))
  return out


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def _data(kind: str, batch: int, seq_len: int, seed: int, args):
  if kind == "code":
    corpus = data.build_corpus(None, max_bytes=4_000_000)
    return data.PackedIterator(corpus.train, batch, seq_len, seed=seed)
  it = data.SyntheticIterator("passkey", batch, seq_len, seed=seed)
  if args.mqar_rows:  # MQAR rows first, passkey rows after them
    mqar = data.SyntheticIterator("mqar", batch, seq_len, seed=seed + 7)
    it = data.MixedIterator(mqar, it, batch - args.mqar_rows)
  return it


def main(argv: list[str] | None = None) -> np.ndarray:
  parser = argparse.ArgumentParser(
      description=__doc__, allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--attention", default="full", choices=("nsa", "full"))
  parser.add_argument("--phases", type=_phases, default=_phases("400:256"))
  parser.add_argument("--score", default="answer", choices=("answer", "all"),
                      help="passkey tokens scored: the key digits or all")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--const-tokens", action="store_true",
                      help="batch size x T of the first phase in every phase")
  parser.add_argument("--mqar-rows", type=int, default=0,
                      help="rows per batch of MQAR instead of passkey")
  parser.add_argument("--num-layers", type=int, default=2)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--rope-base", type=float, default=10000.0,
                      help="RoPE wavelength base of every layer")
  parser.add_argument("--num-selected", type=int, default=4,
                      help="NSA's selected blocks a query (3 are forced)")
  parser.add_argument("--warmup-steps", type=int, default=20)
  parser.add_argument("--eval-lengths", type=_ints, default=[256, 512])
  parser.add_argument("--eval-every", type=int, default=100)
  parser.add_argument("--samples", type=int, default=16,
                      help="examples per (length, depth) at the end")
  parser.add_argument("--plot", default=None,
                      help="PNG path for the final accuracy heatmap")
  args = parser.parse_args(argv)
  if not 0 <= args.mqar_rows < args.batch_size:
    parser.error(f"--mqar-rows must be in [0, {args.batch_size})")
  if args.eval_every < 1 or args.samples < 1:
    parser.error("--eval-every and --samples must be >= 1")
  if not args.rope_base > 1:
    parser.error(f"--rope-base must be > 1, got {args.rope_base}")
  steps = sum(n for n, _, _ in args.phases)
  first_t = args.phases[0][1]
  try:
    cfg = LMConfig(
        d_model=128, num_layers=args.num_layers, num_heads=4, num_kv_heads=2,
        head_dim=32, mlp_hidden=384, attention=args.attention,
        rope_base=args.rope_base,
        nsa=NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32,
                      num_selected=args.num_selected, window=64))
    schedule = train.TrainConfig(
        steps=steps, batch_size=args.batch_size, seq_len=first_t, lr=args.lr,
        warmup_steps=args.warmup_steps)
  except ValueError as e:
    parser.error(str(e))
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, train.make_optimizer(schedule),
                            wrt=nnx.Param)
  train_step = train.SplitTrainStep(model, optimizer)
  step, start, losses = 0, time.time(), []
  for n, seq_len, kind in args.phases:
    batch_size = (args.batch_size * first_t // seq_len if args.const_tokens
                  else args.batch_size)
    it = _data(kind, batch_size, seq_len, step, args)
    for _ in range(n):
      batch = next(it)
      if args.score == "all" or kind == "code":
        batch["mask"] = np.ones_like(batch["mask"])
      out = train_step({k: jnp.asarray(v) for k, v in batch.items()})
      losses.append(float(out["loss"]))
      step += 1
      if step % args.eval_every and step != steps:
        continue
      train_step.sync()
      held = data.SyntheticIterator("passkey", 16, seq_len, seed=999)
      loss_sum, count = train.eval_step(
          model, {k: jnp.asarray(v) for k, v in held.batch_at(0).items()})
      acc = {t: train.accuracy_grid(model, [t], _DEPTHS, samples=4,
                                    seed=1).mean()
             for t in args.eval_lengths}
      print(f"step {step} T {seq_len}: train loss "
            f"{np.mean(losses[-20:]):.3f}, key loss "
            f"{float(loss_sum / count):.3f}, accuracy "
            + ", ".join(f"{t}: {a:.2f}" for t, a in acc.items())
            + f" ({time.time() - start:.0f} s)", flush=True)
  train_step.sync()
  hits = train.hits_grid(model, args.eval_lengths, _DEPTHS,
                         samples=args.samples, seed=5)
  for j, t in enumerate(args.eval_lengths):
    for i, depth in enumerate(_DEPTHS):
      print(f"T {t} depth {depth:.2f}: accuracy "
            f"{hits[i, j].all(-1).mean():.2f}, each digit "
            + " ".join(f"{v:.2f}" for v in hits[i, j].mean(0)))
  if args.plot:
    phases = ", ".join(f"{n} steps at T={t}" for n, t, _ in args.phases)
    phases += f"; RoPE base {args.rope_base:g}"
    path = train.plot_heatmaps(
        {args.attention: hits.all(-1).mean(-1)}, args.eval_lengths, _DEPTHS,
        args.plot, title=f"passkey probe: {phases}; {args.samples} keys a "
        "cell")
    print(f"wrote {path}")
  return hits


if __name__ == "__main__":
  main()
