"""Quality and speed of gated sparse decoding against the dense model.

Perplexity is teacher-forced: ``SeerLM.__call__`` reads at every position
the blocks a decode step there would read, so it is the perplexity of sparse
decoding. Passkey retrieval is real generation: a dense prefill of the
prompt, then greedy decode steps (``nsa_jax.decode.generate``). Gate recall
compares the gate's choice with the oracle's on held-out text. Speed is the
time of one decode step, of the whole model (``time_model_decode``) and of
one layer's attention alone.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from nsa_jax import decode
from nsa_jax.benchmark import time_ms
from nsa_jax.data import synthetic
from nsa_jax.data import tokenizer
from nsa_jax.data.iterators import Batch
from nsa_jax.decode import benchmark as decode_bench
from nsa_jax.seer import decode as decode_lib
from nsa_jax.seer.config import Selection
from nsa_jax.seer.distill import layer_targets
from nsa_jax.seer.gate import AttnGate
from nsa_jax.seer.model import SeerLM
from nsa_jax.seer.select import select_blocks
from nsa_jax.train import loop


def progress_bar(iterable, desc: str, progress: bool):
  """A tqdm bar over ``iterable``, shown only on a terminal."""
  return tqdm.tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True,
                   disable=not (progress and sys.stderr.isatty()))


def perplexity(lm, batches: Sequence[Batch]) -> float:
  """exp of the mean masked cross-entropy (``nsa_jax.train.evaluate``)."""
  return math.exp(loop.evaluate(lm, batches))


def passkey_prompts(seq_len: int, depths: Sequence[float], per_depth: int,
                    seed: int = 0, num_digits: int = 5):
  """Passkey prompts of ``seq_len + 1 - num_digits - 1`` tokens and keys.

  Args:
    seq_len: T of the examples (``synthetic.passkey_example``).
    depths: needle depths in [0, 1].
    per_depth: examples per depth.
    seed: of the keys and filler.
    num_digits: key length.

  Returns:
    (prompts int32 [N, P], keys int32 [N, num_digits] as token ids).
  """
  rng = np.random.default_rng([seed, seq_len])
  prompts, keys = [], []
  for depth in depths:
    for _ in range(per_depth):
      example = synthetic.passkey_example(rng, seq_len, depth, num_digits)
      first = int(np.argmax(example.mask))  # the target there is digit 1
      prompts.append(example.tokens[:first + 1])
      keys.append(tokenizer.encode(example.answer).astype(np.int32))
  return np.stack(prompts), np.stack(keys)


def passkey_accuracy(lm, prompts, keys, *, batch_size: int = 4,
                     progress: bool = True) -> float:
  """Share of prompts whose key the model generates greedily, every digit.

  Args:
    lm: a TransformerLM or SeerLM (prefill, then its decode steps).
    prompts: int [N, P]. keys: int [N, digits].
    batch_size: prompts generated together.
    progress: a tqdm bar on a terminal.

  Returns:
    Accuracy in [0, 1].
  """
  correct = 0
  starts = range(0, len(prompts), batch_size)
  for i in progress_bar(starts, "passkey", progress):
    out = decode.generate(lm, prompts[i:i + batch_size],
                          max_new_tokens=keys.shape[1],
                          sampling=decode.SamplingConfig.greedy())
    got = np.asarray(out.tokens)
    correct += int((got == keys[i:i + batch_size]).all(axis=1).sum())
  return correct / len(prompts)


def _chosen(table, num_blocks: int):
  """bool [..., N]: the blocks a table [..., n] names (-1 names none)."""
  idx = jnp.where(table >= 0, table, num_blocks)
  zeros = jnp.zeros(table.shape[:-1] + (num_blocks + 1,), bool)
  return jnp.put_along_axis(zeros, idx, True, axis=-1,
                            inplace=False)[..., :num_blocks]


@nnx.jit(static_argnames=("budgets", "impl"))
def _recall_counts(lm: SeerLM, tokens, budgets: tuple[int, ...], impl: str):
  """(hits, wanted) float32 [len(budgets)], summed over layers and rows."""
  b = lm.block_size
  batch, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t), (batch, t))
  num_blocks = -(-t // b)
  j = jnp.arange(num_blocks)
  own = (positions // b)[:, :, None, None]
  free = (j != 0) & (j != own)  # not forced: what the scores decide
  hits = jnp.zeros((len(budgets),))
  wanted = jnp.zeros((len(budgets),))
  for target, log_probs in layer_targets(lm, tokens, impl=impl):
    for i, budget in enumerate(budgets):
      selection = Selection(budget=budget)
      sparse = (own + 1 > selection.num_slots(b, num_blocks))
      oracle = _chosen(select_blocks(target, positions, selection, b,
                                     num_blocks), num_blocks) & free & sparse
      gate = _chosen(select_blocks(jnp.exp(log_probs), positions, selection,
                                   b, num_blocks), num_blocks)
      hits = hits.at[i].add(jnp.sum(oracle & gate))
      wanted = wanted.at[i].add(jnp.sum(oracle))
  return hits, wanted


def gate_recall(lm: SeerLM, batches: Sequence[Batch], budgets: Sequence[int],
                *, impl: str = "auto") -> dict[int, float | None]:
  """Recall of the oracle's top blocks by the gate, per token budget.

  At each budget, both the oracle's target and the gate's probabilities
  choose blocks by the same rule (``select_blocks``); recall is the share
  of the oracle's choices, beyond the forced block 0 and own block, that
  the gate also makes, over the queries (every layer and kv head) that
  have more causal blocks than the budget holds.

  Args:
    lm: the SeerLM.
    batches: held-out batches (``inputs``).
    budgets: tokens.
    impl: of the oracle.

  Returns:
    budget -> recall in [0, 1] (None where no query was sparse).
  """
  budgets = tuple(int(x) for x in budgets)
  hits, wanted = np.zeros(len(budgets)), np.zeros(len(budgets))
  for batch in batches:
    h, w = _recall_counts(lm, jnp.asarray(batch["inputs"]), budgets, impl)
    hits, wanted = hits + np.asarray(h), wanted + np.asarray(w)
  return {budget: (float(h / w) if w else None)
          for budget, h, w in zip(budgets, hits, wanted)}


def model_decode_ms(lm, context: int, batch: int, *, iters: int = 10) -> float:
  """ms of one whole-model decode step at ``context`` cached tokens."""
  return decode_bench.time_model_decode(lm, context, batch, iters=iters)


def random_cache(gate: AttnGate, context: int, batch: int, dtype,
                 seed: int = 0) -> decode_lib.SeerCache:
  """A SeerCache holding ``context`` random tokens a row (for timing)."""
  cache = decode_lib.SeerCache.create(
      batch, context, gate.num_kv_heads, gate.head_dim,
      gate.config.block_size, gate.config.gate_dim, dtype=dtype)
  leaves, treedef = jax.tree.flatten(cache)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating) else x
            for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, leaves).replace(
      lengths=jnp.full((batch,), context, jnp.int32))


def attention_decode_ms(gate: AttnGate, context: int, batch: int,
                        selections: Sequence[Selection], *, dtype,
                        dense: Sequence[str] = ("xla",), iters: int = 20,
                        steps: int = 8,
                        impl: str = "auto") -> dict[str, float | str]:
  """ms of one layer's decode attention: gated sparse against dense.

  The gated step includes the gate's scores and the block choice; the dense
  ones are ``decode.benchmark.dense_decode_methods`` over the same cache.

  Args:
    gate: an AttnGate (its shape sets the heads and dims).
    context: cached tokens a row. batch: rows.
    selections: one timing each, named ``str(selection)``.
    dtype: of the cache and queries.
    dense: names of dense baselines ("xla"; on a GPU also "cudnn",
      "pallas_decode").
    iters: timing repetitions.
    steps: chained decode steps per timed call
      (``decode.benchmark.chained``): the time per step leaves out the
      host's dispatch of a call.
    impl: of the sparse attention.

  Returns:
    name -> ms, or the error message of a method that failed.
  """
  cache = random_cache(gate, context, batch, dtype)
  q = jax.random.normal(jax.random.key(1), (batch, 1, gate.num_heads,
                                            gate.head_dim)).astype(dtype)
  graphdef, state = nnx.split(gate)
  times = {}

  def timed(name, fn, *args):
    try:
      times[name] = time_ms(decode_bench.chained(fn, steps), *args,
                            iters=iters) / steps
    except Exception as e:  # pylint: disable=broad-except
      times[name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"

  for selection in selections:
    timed(str(selection),
          lambda q, s, c, selection=selection: decode_lib.decode_attention(
              nnx.merge(graphdef, s), q, q, c, selection, impl=impl)[0],
          q, state, cache)
  for name, (fn, _) in decode_bench.dense_decode_methods(tuple(dense)).items():
    timed(name, lambda q, c, fn=fn: fn(q[:, 0], None, c)[:, None], q, cache)
  return times
