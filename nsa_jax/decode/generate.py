"""Generation: a jit-compiled sampling loop over TransformerLM decode steps."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.data.token_ids import check_token_ids
from nsa_jax.decode import cache as cache_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is drawn from the logits; hashable (a jit static).

  Attributes:
    temperature: logits are divided by it; 0 is greedy (argmax, the other
      settings are then unused).
    top_k: keep the k most likely tokens (None: all).
    top_p: keep the smallest set of most likely tokens whose probability
      reaches p (nucleus sampling; None: all). Tokens tied with the least
      likely kept one are kept too.
  """

  temperature: float = 1.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
      raise ValueError(f"SamplingConfig.temperature must be a number >= 0, "
                       f"got {t!r}")
    k = self.top_k
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)
                          or k < 1):
      raise ValueError(f"SamplingConfig.top_k must be None or an int >= 1, "
                       f"got {k!r}")
    p = self.top_p
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                          or not 0 < p <= 1):
      raise ValueError(f"SamplingConfig.top_p must be None or in (0, 1], "
                       f"got {p!r}")

  @classmethod
  def greedy(cls) -> SamplingConfig:
    return cls(temperature=0.0)


def sample_logits(logits, key, sampling: SamplingConfig):
  """Draws one token per row.

  Args:
    logits: float [B, V].
    key: a PRNG key.
    sampling: temperature, top-k, top-p.

  Returns:
    int32 [B].
  """
  logits = logits.astype(jnp.float32)
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  vocab = logits.shape[-1]
  if sampling.top_k is not None and sampling.top_k < vocab:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None and sampling.top_p < 1:
    ranked = jax.lax.top_k(logits, vocab)[0]  # [B, V] descending
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better tokens
    keep = before < sampling.top_p  # the first token always
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generation(NamedTuple):
  """What ``generate`` returns.

  Attributes:
    tokens: int32 [B, max_new_tokens]; after a row stops, ``pad_id``.
    num_generated: int32 [B], tokens produced per row, a stop token included.
    stopped: bool [B], the row produced a stop token.
  """

  tokens: jax.Array
  num_generated: jax.Array
  stopped: jax.Array


def generate(model, prompt, *, lengths=None, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             stop_tokens: tuple[int, ...] = (), max_length: int | None = None,
             max_query_len: int = 1, pad_id: int = 0) -> Generation:
  """Continues each prompt, in one jit-compiled ``lax.while_loop``.

  The prompt is prefilled through the training ops, then each iteration
  samples one token per row (``sample_logits`` with the key
  ``fold_in(key(seed), step)``) and decodes it. A row stops at its first
  stop token; the loop ends when every row has stopped or after
  ``max_new_tokens``. The same seed, prompt and batch give the same tokens;
  one row's draws depend on the batch it is in (the key is per step).

  Args:
    model: a TransformerLM.
    prompt: int [B, T], right-padded prompts.
    lengths: int [B] in [1, T], the prompt lengths (default T).
    max_new_tokens: most tokens to generate per row.
    sampling: SamplingConfig (greedy: ``SamplingConfig.greedy()``).
    seed: of the sampling keys.
    stop_tokens: token ids that end a row (included in its output).
    max_length: cache capacity, default ``max(lengths) + max_new_tokens``.
    max_query_len: passed to ``init_cache``.
    pad_id: fills a row's tokens after it stops.

  Returns:
    Generation(tokens, num_generated, stopped).

  Raises:
    CacheOverflowError: a prompt plus ``max_new_tokens`` exceeds max_length.
    ValueError: a bad prompt, length, token id or setting.
  """
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt must be int [B, T], got {prompt.shape} "
                     f"{prompt.dtype}")
  b, t = prompt.shape
  vocab = model.config.vocab_size
  check_token_ids(prompt, vocab)
  lengths = np.full((b,), t) if lengths is None else np.asarray(lengths)
  if lengths.shape != (b,) or ((lengths < 1) | (lengths > t)).any():
    raise ValueError(f"lengths must be int [B={b}] in [1, T={t}], got "
                     f"{lengths.tolist()}")
  if isinstance(max_new_tokens, bool) or not isinstance(
      max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got "
                     f"{max_new_tokens!r}")
  if not isinstance(sampling, SamplingConfig):
    raise TypeError(f"sampling must be a SamplingConfig, got {sampling!r}")
  stop_tokens = tuple(int(s) for s in stop_tokens)
  for token in stop_tokens + (pad_id,):
    if not 0 <= token < vocab:
      raise ValueError(f"stop/pad token {token} is outside [0, {vocab})")
  if max_length is None:
    max_length = int(lengths.max()) + max_new_tokens
  if t > max_length:
    raise cache_lib.CacheOverflowError(
        f"cache overflow: the prompt has T={t} tokens, max_length="
        f"{max_length}")
  # Every sampled token is written to the cache (the last one included).
  cache_lib.check_capacity(lengths, max_new_tokens, max_length, "generate")
  graphdef, state = nnx.split(model)
  tokens, count, stopped = _generate(
      graphdef, state, jnp.asarray(prompt, jnp.int32),
      jnp.asarray(lengths, jnp.int32), jax.random.key(seed),
      max_new_tokens=max_new_tokens, sampling=sampling,
      stop_tokens=stop_tokens, max_length=max_length,
      max_query_len=max_query_len, pad_id=pad_id)
  return Generation(tokens, count, stopped)


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "sampling", "stop_tokens", "max_length",
    "max_query_len", "pad_id"))
def _generate(graphdef, state, prompt, lengths, key, *, max_new_tokens,
              sampling, stop_tokens, max_length, max_query_len, pad_id):
  """The loop of ``generate``; prompt [B, T], lengths [B]."""
  model = nnx.merge(graphdef, state)
  b = prompt.shape[0]
  cache = model.init_cache(b, max_length, max_query_len=max_query_len)
  logits, cache = model.prefill(prompt, cache, lengths)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)
  stops = jnp.asarray(stop_tokens, jnp.int32)

  def cond(carry):
    step, _, _, _, _, stopped = carry
    return (step < max_new_tokens) & ~jnp.all(stopped)

  def body(carry):
    step, cache, logits, tokens, count, stopped = carry
    token = sample_logits(logits, jax.random.fold_in(key, step), sampling)
    token = jnp.where(stopped, pad_id, token)
    tokens = tokens.at[:, step].set(token)
    count = count + (~stopped).astype(jnp.int32)
    stopped = stopped | jnp.isin(token, stops)
    step_logits, cache = model.decode_step(token[:, None], cache)
    return step + 1, cache, step_logits[:, 0], tokens, count, stopped

  init = (jnp.int32(0), cache, last[:, 0],
          jnp.full((b, max_new_tokens), pad_id, jnp.int32),
          jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool))
  _, _, _, tokens, count, stopped = jax.lax.while_loop(cond, body, init)
  return tokens, count, stopped
