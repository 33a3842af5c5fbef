"""nsa_decode on a random cache: the Pallas branches equal XLA's."""

from decode_testing import poison
from decode_testing import TINY
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.decode import attention as attn_lib
from nsa_jax.decode import NSACache
from nsa_jax.selection import top_n_at
from nsa_jax.selection import top_n_blocks

from nsa_cases import normal


def _random_cache(shared_kv, lengths, max_length=80, hkv=2, dk=16, dv=8):
  cache = NSACache.create(len(lengths), max_length, TINY, hkv, dk, dv,
                          shared_kv=shared_kv)
  leaves, treedef = jax.tree.flatten(cache)
  rng = np.random.default_rng(len(lengths))
  filled = [normal(rng, x.shape, x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating) else x
            for x in leaves]
  cache = jax.tree.unflatten(treedef, filled)
  cache = cache.replace(lengths=jnp.asarray(lengths, jnp.int32))
  return poison((cache,))[0]


@pytest.mark.parametrize("shared_kv", [False, True])
def test_pallas_branches_equal_xla(shared_kv):
  lengths = [80, 33, 7, 50]
  cache = _random_cache(shared_kv, lengths)
  rng = np.random.default_rng(1)
  q = normal(rng, (4, 1, 8, 16))
  gates = jax.nn.sigmoid(normal(rng, (4, 1, 8, 3)))
  # Jitted, gates an argument: one program per impl for the three gatings.
  run = {impl: jax.jit(lambda q, gates, cache, impl=impl: attn_lib.nsa_decode(
      q, gates, cache, TINY, impl=impl)) for impl in ("xla", "pallas")}
  xla = run["xla"](q, gates, cache)
  pallas = run["pallas"](q, gates, cache)
  assert np.isfinite(np.asarray(xla)).all()
  np.testing.assert_allclose(pallas, xla, atol=2e-5, rtol=2e-5)
  # Each branch alone, so no comparison is carried by another branch.
  for branch in ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]):
    only = gates * jnp.array(branch)
    np.testing.assert_allclose(
        run["pallas"](q, only, cache), run["xla"](q, only, cache),
        atol=2e-5, rtol=2e-5, err_msg=f"{branch=}")


def test_selection_in_decode_equals_top_n_blocks_of_the_full_path():
  # top_n_at at positions t equals selection.top_n_blocks row t.
  scores = jax.random.uniform(jax.random.key(0), (2, 70, 3, 5))
  scores = scores.at[:, :, :, 2].set(scores[:, :, :, 1])  # ties
  full = np.asarray(top_n_blocks(scores, TINY))
  positions = jnp.array([[0, 15, 16, 47], [48, 63, 64, 69]], jnp.int32)
  rows = scores[jnp.arange(2)[:, None], positions]  # [2, 4, 3, 5]
  got = np.asarray(top_n_at(rows, positions, TINY))
  for b in range(2):
    for j, t in enumerate(np.asarray(positions[b])):
      np.testing.assert_array_equal(got[b, j], full[b, t])
