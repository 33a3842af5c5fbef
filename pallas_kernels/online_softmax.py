"""FlashAttention-2 tile steps shared by the attention kernels (base 2).

Forward: ``init`` a carry, ``step`` it once per key tile, ``finalize`` it.
Backward: ``probabilities`` recomputes a tile's softmax from the forward's
residuals. Scores are base-2 logits ``s = scale * log2(e) * q.k`` (exp2 is
the native instruction).

Precision. The residuals are the running max ``m`` (a maximum of the very
scores ``s`` the forward saw, so exact) and ``log2(l)`` of the final row sum
``l``, kept apart: the backward computes ``exp2((s - m) - log2 l)``, where
``s - m`` is exact (Sterbenz) for every key whose probability matters, so a
probability's relative error is a few ulp of 1 plus the difference between
the forward's and the backward's recomputed ``s``, whatever ``|s|`` is. Folding
them into one ``lse = m + log2 l`` (and converting bases) costs ulp(|lse|)
absolute error in the exponent: at logits near 1e6, 6% of p (issue 10, item
1). The bound is that of the logits themselves: the backward's ``s`` equals
the forward's to the rounding of the ``q.k`` dot, ulp(|s|).

Masked keys contribute exactly nothing, whatever their values: ``values``
zeroes non-finite rows of a key/value tile before any product (0 * inf is
NaN) and reports them; a row that can see a non-finite key or value gets a
NaN output, as every path of the library does.

All shapes are tiles: s / mask [rows, keys], v [keys, D], per-row [rows].
Integers are int32 and floats float32 explicitly, so kernels also run with
``JAX_ENABLE_X64=1``.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels import triton_compat as tc


def values(x):
  """A key or value tile with non-finite rows zeroed.

  Args:
    x: [keys, D] tile.

  Returns:
    (x with every row holding a non-finite entry set to 0, int32 [keys]: 1
    for those rows).
  """
  # Triton has no reduce_or: any() as a max over int32.
  bad = jnp.max(jnp.where(jnp.isfinite(x), 0, 1).astype(jnp.int32), axis=1)
  return jnp.where(bad[:, None] > 0, jnp.zeros_like(x), x), bad


def init(rows: int, dv: int):
  """Carry (acc [rows, Dv], m [rows], l [rows], bad [rows]) of no key."""
  return (jnp.zeros((rows, dv), jnp.float32),
          jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows,), jnp.int32))


def step(carry, s, mask, v, bad_keys):
  """One FlashAttention-2 online-softmax update with a [rows, keys] tile.

  Args:
    carry: from ``init`` or a previous step.
    s: float32 [rows, keys] base-2 logits (any value where masked).
    mask: bool [rows, keys], True where the row sees the key.
    v: [keys, Dv] value tile, non-finite rows zeroed (``values``).
    bad_keys: int32 [keys], 1 where the key or value was non-finite.

  Returns:
    The updated carry.
  """
  acc, m, l, bad = carry
  s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  # A row that has seen nothing keeps m = -inf; shift by 0 to avoid inf-inf.
  m_safe = jnp.where(m_new == -jnp.inf, jnp.float32(0), m_new)
  alpha = jnp.exp2(m - m_safe)  # [rows]
  p = jnp.exp2(s - m_safe[:, None])  # [rows, keys], 0 where masked
  acc = alpha[:, None] * acc + tc.dot(p.astype(v.dtype), v)
  seen_bad = jnp.where(mask, bad_keys[None, :], 0)
  bad = jnp.maximum(bad, jnp.max(seen_bad, axis=1))
  return acc, m_new, alpha * l + jnp.sum(p, axis=1), bad


def finalize(carry):
  """Normalises the accumulator and returns the backward's residuals.

  Returns:
    (out float32 [rows, Dv]: 0 for a row that saw nothing, NaN for one that
    saw a non-finite key or value; m float32 [rows]: the base-2 running
    max, 0 for a row that saw nothing; log2l float32 [rows]: log2 of the row
    sum, 0 for such a row; lse float32 [rows]: natural-log log-sum-exp,
    -inf for such a row).
  """
  acc, m, l, bad = carry
  seen = l > 0
  l_safe = jnp.where(seen, l, jnp.float32(1))
  out = acc / l_safe[:, None]
  out = jnp.where(bad[:, None] > 0, jnp.float32(jnp.nan), out)
  m = jnp.where(seen, m, jnp.float32(0))
  log2l = jnp.log2(l_safe)
  lse = jnp.where(seen, (m + log2l) * jnp.float32(tc.LN2),
                  jnp.float32(-jnp.inf))
  return out, m, log2l, lse


def probabilities(s, mask, m, log2l):
  """The forward's softmax of a [rows, keys] tile, recomputed.

  Args:
    s: float32 [rows, keys] base-2 logits, computed as the forward did.
    mask: bool [rows, keys].
    m, log2l: float32 [rows] residuals from ``finalize``.

  Returns:
    float32 [rows, keys], 0 where masked.
  """
  p = jnp.exp2((s - m[:, None]) - log2l[:, None])
  return jnp.where(mask, p, jnp.float32(0))
