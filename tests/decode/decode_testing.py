"""Helpers of the decode tests: random small LMs, jitted steps, poison."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import NSAConfig
from nsa_jax.decode import cache as cache_lib
from nsa_jax.modules import LMConfig
from nsa_jax.modules import TransformerLM

VOCAB = 64
TINY = NSAConfig.tiny()  # l=8, d=4, l'=16, n=4 (1 initial, 2 local), w=32


def make_model(attention="nsa", seed=0, **overrides):
  """A 2-layer LM with every parameter redrawn so logits are O(1).

  The default initialisation (embeddings of std 0.02, zero gate kernels)
  gives logits near 0 and equal gates, where a tolerance test is weak.
  """
  fields = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8, mlp_hidden=64, nsa=TINY,
                attention=attention, impl="xla")
  fields.update(overrides)
  model = TransformerLM(LMConfig(**fields), rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  rng = np.random.default_rng(seed + 1000)  # NumPy: no compilation per shape
  new = []
  for x in leaves:
    noise = rng.standard_normal(x.shape)
    value = noise / np.sqrt(x.shape[0]) if x.ndim >= 2 else 1.0 + 0.3 * noise
    new.append(jax.device_put(value.astype(x.dtype)))
  nnx.update(model, jax.tree.unflatten(treedef, new))
  return model


def make_tokens(batch, seq_len, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, VOCAB, (batch, seq_len)), jnp.int32)


forward = nnx.jit(lambda model, tokens: model(tokens))
prefill = nnx.jit(lambda model, tokens, cache, lengths:
                  model.prefill(tokens, cache, lengths))
decode_step = nnx.jit(lambda model, tokens, cache:
                      model.decode_step(tokens, cache))


def poison(caches, config: NSAConfig = TINY):
  """Caches with NaN in every entry the decode path must never read.

  Raw K/V past each row's length, compressed tokens not yet complete, unused
  ring slots: all NaN. A decode step that lets any of them into its output
  (through a score or a value) returns NaN.
  """
  out = []
  for cache in caches:
    lengths = cache.lengths[:, None, None, None]
    nan = lambda x, keep: jnp.where(keep, x, jnp.nan)
    pos = jnp.arange(cache.k.shape[1])[None, :, None, None]
    updates = dict(k=nan(cache.k, pos < lengths), v=nan(cache.v, pos < lengths))
    if isinstance(cache, cache_lib.NSACache):
      i = jnp.arange(cache.k_cmp.shape[1])[None, :, None, None]
      complete = i * config.cmp_stride + config.cmp_block <= lengths
      updates.update(k_cmp=nan(cache.k_cmp, complete),
                     v_cmp=nan(cache.v_cmp, complete))
      for name in ("k_win", "v_win", "k_cmp_raw", "v_cmp_raw"):
        ring = getattr(cache, name)
        if ring is not None:
          used = cache_lib.ring_positions(cache.lengths, ring.shape[1]) >= 0
          updates[name] = nan(ring, used[:, :, None, None])
    out.append(cache.replace(**updates))
  return tuple(out)
