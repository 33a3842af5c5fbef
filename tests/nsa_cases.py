"""Shapes that stress NSA's masks, tolerances, and random inputs for them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import NSAConfig

# l=8, d=4, l'=16, n=4 (1 initial + 2 local + 1 free), w=32.
TINY = NSAConfig.tiny()


@dataclasses.dataclass(frozen=True)
class Case:
  """One shape: batch, length, query/kv heads, key/value head dims."""
  b: int
  t: int
  hq: int
  hkv: int
  dk: int
  dv: int

  def __str__(self):
    return (f"B{self.b}-T{self.t}-Hq{self.hq}-Hkv{self.hkv}-Dk{self.dk}"
            f"-Dv{self.dv}")


# T off every block edge, T < l (no compressed token), T == l, T on a
# selection-block edge; GQA groups 1, 2, 4, 16; Dk != Dv; batch > 1.
CASES = [
    Case(2, 37, 4, 2, 16, 8),
    Case(1, 5, 2, 2, 8, 8),
    Case(1, 8, 4, 4, 8, 8),
    Case(1, 48, 16, 1, 8, 12),
    Case(2, 50, 4, 1, 8, 8),
]

# The suite's one tolerance table: (forward, gradient) tolerance per input
# dtype, used as both atol and rtol against the float32 reference.
TOLERANCES = {
    jnp.float64: (1e-10, 1e-10),
    jnp.float32: (2e-5, 5e-5),
    jnp.float16: (5e-3, 2e-2),
    jnp.bfloat16: (3e-2, 8e-2),
}


def tolerance(dtype, kind: str = "fwd") -> float:
  """The table's forward ("fwd") or gradient ("grad") tolerance."""
  fwd, grad = TOLERANCES[jnp.dtype(dtype).type]
  return fwd if kind == "fwd" else grad


# chex keyword form of the forward column.
TOLERANCE = {dtype: dict(atol=fwd, rtol=fwd)
             for dtype, (fwd, _) in TOLERANCES.items()}


def normal(rng: np.random.Generator, shape, dtype=jnp.float32) -> jax.Array:
  """Standard normal draws of ``shape`` in ``dtype``, made by NumPy.

  NumPy, not jax.random: on a CPU jax.random compiles one threefry program
  per shape, which takes longer than most of the tests that use the draws;
  and ``device_put``, which compiles nothing, where ``jnp.asarray`` compiles
  a copy per shape.
  """
  return jax.device_put(rng.standard_normal(shape).astype(dtype))


def make_inputs(case: Case, dtype=jnp.float32, config: NSAConfig = TINY,
                seed: int = 0):
  """Random q, k, v, k_cmp, v_cmp, gates for ``case`` in ``dtype``."""
  rng = np.random.default_rng(seed)
  tc = config.num_compressed(case.t)
  draw = lambda *shape: normal(rng, shape, dtype)
  return dict(
      q=draw(case.b, case.t, case.hq, case.dk),
      k=draw(case.b, case.t, case.hkv, case.dk),
      v=draw(case.b, case.t, case.hkv, case.dv),
      k_cmp=draw(case.b, tc, case.hkv, case.dk),
      v_cmp=draw(case.b, tc, case.hkv, case.dv),
      gates=jax.device_put((1 / (1 + np.exp(-rng.standard_normal(
          (case.b, case.t, case.hq, 3))))).astype(dtype)),
  )


def random_block_table(case: Case, num_slots: int, block_size: int,
                       seed: int = 0):
  """int32 [B, T, Hkv, n]: distinct random causal blocks, some slots -1."""
  rng = np.random.default_rng(seed)
  table = np.full((case.b, case.t, case.hkv, num_slots), -1, np.int32)
  for b in range(case.b):
    for t in range(case.t):
      causal = t // block_size + 1
      for g in range(case.hkv):
        count = rng.integers(0, min(num_slots, causal) + 1)
        table[b, t, g, :count] = rng.choice(causal, count, replace=False)
        rng.shuffle(table[b, t, g])
  return jnp.asarray(table)
