"""FlashAttention-2 tile steps shared by the attention kernels (base 2).

Forward: ``init`` a carry, ``step`` it once per key tile, ``finalize`` it.
Backward: ``probabilities`` recomputes a tile's softmax from the forward's
residuals. Scores are the raw dots ``s = q.k``; the softmax is that of
``c * s`` with ``c = scale * log2(e) > 0``, taken as ``exp2(c * (s - m))``.

Precision (issue 10, item 1). The residuals are the row maximum ``m`` of the
raw dots (a maximum of the very values the forward saw, so exact) and
``log2(l)`` of the row sum ``l``, kept apart; the backward computes
``exp2(c * (s - m) - log2 l)``. ``s - m`` is exact (Sterbenz) for every key
whose probability matters, and the dot feeds that subtraction directly (no
rounded ``c * s`` at the logits' magnitude, which a compiler may also
reassociate differently in two kernels). So when the backward's dot returns
the forward's values bit for bit (same operands, same K order), its
probabilities are the forward's to a few ulp of 1 whatever the logits'
size. Folding the residuals into one ``lse = c*m + log2 l``, converted to
natural log and back, costs ulp(|lse|) of absolute error in the exponent:
at logits near 1e6 that was 6% of p and 0.38 in dV. What remains is the
logits' own rounding: a dot that differs in the last bit between the
forward and the backward moves p by about ``c * ulp(|s|)`` relative, as in
any float32 attention.

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


def step(carry, s, mask, v, bad_keys, c):
  """One FlashAttention-2 online-softmax update with a [rows, keys] tile.

  Args:
    carry: from ``init`` or a previous step.
    s: float32 [rows, keys] raw dots q.k (any value where masked).
    mask: bool [rows, keys], True where the row sees the key.
    v: [keys, Dv] value tile, non-finite rows zeroed (``values``).
    bad_keys: int32 [keys], 1 where the key or value was non-finite; None
      when the caller has already cleaned its keys (no per-tile check).
    c: scale * log2(e), a positive Python float.

  Returns:
    The updated carry.
  """
  acc, m, l, bad = carry
  c = jnp.float32(c)
  s = jnp.where(mask, s, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  # A row that has seen nothing keeps m = -inf; shift by 0 to avoid inf-inf.
  m_safe = jnp.where(m_new == -jnp.inf, jnp.float32(0), m_new)
  alpha = jnp.exp2((m - m_safe) * c)  # [rows]
  p = jnp.exp2((s - m_safe[:, None]) * c)  # [rows, keys], 0 where masked
  acc = alpha[:, None] * acc + tc.dot(p.astype(v.dtype), v)
  if bad_keys is not None:
    seen_bad = jnp.where(mask, bad_keys[None, :], 0)
    bad = jnp.maximum(bad, jnp.max(seen_bad, axis=1))
  return acc, m_new, alpha * l + jnp.sum(p, axis=1), bad


def finalize(carry, scale):
  """Normalises the accumulator and returns the backward's residuals.

  Args:
    carry: after the last ``step``.
    scale: the softmax scale (positive).

  Returns:
    (out float32 [rows, Dv]: 0 for a row that saw nothing, NaN for one that
    saw a non-finite key or value; m float32 [rows]: the row max of the raw
    dots, 0 for a row that saw nothing; log2l float32 [rows]: log2 of the
    row sum, 0 for such a row; lse float32 [rows]: natural-log
    log-sum-exp of ``scale * s``, -inf for such a row).
  """
  acc, m, l, bad = carry
  seen = l > 0
  l_safe = jnp.where(seen, l, jnp.float32(1))
  out = acc / l_safe[:, None]
  out = jnp.where(bad[:, None] > 0, jnp.float32(jnp.nan), out)
  m = jnp.where(seen, m, jnp.float32(0))
  log2l = jnp.log2(l_safe)
  lse = jnp.where(seen, m * jnp.float32(scale) + log2l * jnp.float32(tc.LN2),
                  jnp.float32(-jnp.inf))
  return out, m, log2l, lse


def probabilities(s, mask, m, log2l, c):
  """The forward's softmax of a [rows, keys] tile, recomputed.

  Args:
    s: float32 [rows, keys] raw dots, computed as the forward did.
    mask: bool [rows, keys].
    m, log2l: float32 [rows] residuals from ``finalize``.
    c: scale * log2(e), as given to ``step``.

  Returns:
    float32 [rows, keys], 0 where masked.
  """
  p = jnp.exp2((s - m[:, None]) * jnp.float32(c) - log2l[:, None])
  return jnp.where(mask, p, jnp.float32(0))
