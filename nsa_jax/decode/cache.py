"""KV caches for incremental decoding: NSA (raw, window, compressed), dense.

Both caches are ``flax.struct`` dataclasses (pytrees usable under ``jax.jit``)
preallocated to a maximum length, with per-row lengths so one batch holds
sequences of different lengths. Row ``b`` holds valid entries at positions
``[0, lengths[b])``; everything past that is garbage that the decode math
never reads (it masks values, not only scores, so even NaN/inf there
contributes exactly nothing).

Capacity: a write that would take a row past ``max_length`` raises
``CacheOverflowError`` when the lengths are concrete (eager calls, and
``nsa_jax.decode.generate`` before it traces). Under ``jit`` the lengths are
traced and cannot be checked: writes past the allocation are dropped (never
wrapped around onto earlier positions), the row's length still advances past
``max_length`` (``cache.overflowed()`` says which rows did) and every output of
that row is NaN from that step on, so an overflow is loud, not silent.
"""

from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.config import NSAConfig


class CacheOverflowError(ValueError):
  """Raised when tokens are written past a cache's ``max_length``."""


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def concrete(x):
  """``x`` as numpy, or None when it is traced."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


def check_capacity(lengths, num_new: int, max_length: int, what: str = ""):
  """Raises CacheOverflowError if a concrete row would pass ``max_length``.

  Args:
    lengths: int [B], the rows' lengths before the write (traced: no check).
    num_new: tokens about to be written to every row.
    max_length: the cache's capacity.
    what: what is being written, for the message.

  Raises:
    CacheOverflowError: naming the first row that does not fit.
  """
  lengths = concrete(lengths)
  if lengths is None:
    return
  over = np.nonzero(lengths + num_new > max_length)[0]
  if over.size:
    row = int(over[0])
    raise CacheOverflowError(
        f"cache overflow{' in ' + what if what else ''}: row {row} holds "
        f"{int(lengths[row])} tokens, writing {num_new} more exceeds "
        f"max_length={max_length}; allocate a larger cache with init_cache")


def ring_positions(lengths, size: int):
  """The position each slot of a ring buffer holds, -1 for an unused slot.

  Slot ``s`` of a ring of ``size`` entries holds position ``p = s (mod size)``,
  the newest such ``p < length``.

  Args:
    lengths: int32 [B], tokens written so far.
    size: ring entries.

  Returns:
    int32 [B, size].
  """
  s = jnp.arange(size, dtype=jnp.int32)[None, :]
  last = lengths.astype(jnp.int32)[:, None] - 1
  p = last - jnp.mod(last - s, size)
  return jnp.where(p >= 0, p, -1)


def write(buffer, new, positions, ring: bool = False):
  """Writes ``new`` at ``positions`` (modulo the buffer length for a ring).

  Args:
    buffer: [B, S, H, D].
    new: [B, Q, H, D].
    positions: int32 [B, Q]; a position >= S (not a ring) is dropped, never
      wrapped around.
    ring: index slots by ``position mod S``.

  Returns:
    [B, S, H, D].
  """
  idx = jnp.mod(positions, buffer.shape[1]) if ring else positions
  rows = jnp.arange(buffer.shape[0])[:, None]
  return buffer.at[rows, idx].set(new.astype(buffer.dtype), mode="drop")


def read(buffer, positions, ring: bool = False):
  """Gathers the entries of ``positions`` (clipped into range).

  Args:
    buffer: [B, S, H, D].
    positions: int32 [B, P].
    ring: index slots by ``position mod S``.

  Returns:
    [B, P, H, D].
  """
  size = buffer.shape[1]
  idx = jnp.mod(positions, size) if ring else jnp.clip(positions, 0, size - 1)
  return jnp.take_along_axis(buffer, idx[:, :, None, None], axis=1)


def fill_ring(ring_buffer, values, lengths):
  """A ring buffer holding the newest ``size`` of each row's valid values.

  Args:
    ring_buffer: [B, R, H, D], only its shape and dtype are used.
    values: [B, T, H, D], positions 0 .. T-1 of every row.
    lengths: int32 [B] <= T, the valid prefix of each row.

  Returns:
    [B, R, H, D]; unused slots are zero.
  """
  pos = ring_positions(lengths, ring_buffer.shape[1])  # [B, R]
  got = read(values, pos)
  return jnp.where((pos >= 0)[:, :, None, None], got,
                   jnp.zeros((), got.dtype)).astype(ring_buffer.dtype)


@struct.dataclass
class FullCache:
  """Dense attention cache.

  Attributes:
    k: [B, S, Hkv, D] keys after RoPE.
    v: [B, S, Hkv, D] values.
    lengths: int32 [B], valid tokens per row.
    max_length: capacity S (static).
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  max_length: int = struct.field(pytree_node=False)

  @classmethod
  def create(cls, batch: int, max_length: int, num_kv_heads: int,
             head_dim: int, dtype=jnp.float32) -> FullCache:
    """An empty cache of ``max_length`` tokens per row."""
    _check_sizes(batch=batch, max_length=max_length)
    shape = (batch, max_length, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               lengths=jnp.zeros((batch,), jnp.int32), max_length=max_length)

  def overflowed(self):
    """bool [B]: rows written past ``max_length`` (only possible under jit)."""
    return self.lengths > self.max_length


@struct.dataclass
class NSACache:
  """Incremental-decoding state of one NSA layer.

  Attributes:
    k, v: [B, S, Hkv, Dk/Dv] raw keys (after RoPE) and values of the
      selection branch; S is ``max_length`` rounded up to a multiple of l'
      so the cache splits into whole selection blocks.
    k_win, v_win: [B, Rw, Hkv, Dk/Dv] ring buffer of the window branch's own
      keys/values, ``Rw = min(w + max_query_len - 1, S)`` rounded up to a
      multiple of l' (whole blocks for the decode kernel); None with shared
      K/V (the window then reads k, v).
    k_cmp_raw, v_cmp_raw: [B, Rc, Hkv, Dk/Dv] ring buffer of the compression
      branch's raw keys/values, ``Rc = l + max_query_len - 1``, enough for the
      newest block of every query of a step; None with shared K/V (the
      compressor then reads k, v).
    k_cmp, v_cmp: [B, Tc, Hkv, Dk/Dv] compressed tokens,
      ``Tc = num_compressed(max_length)`` rounded up to a multiple of 64
      (whole steps of the decode kernel); token i of row b is valid once
      ``i*d + l <= lengths[b]``.
    lengths: int32 [B], valid tokens per row.
    max_length: capacity (static).
    max_query_len: most tokens one decode step may take (static).
  """

  k: jax.Array
  v: jax.Array
  k_win: jax.Array | None
  v_win: jax.Array | None
  k_cmp_raw: jax.Array | None
  v_cmp_raw: jax.Array | None
  k_cmp: jax.Array
  v_cmp: jax.Array
  lengths: jax.Array
  max_length: int = struct.field(pytree_node=False)
  max_query_len: int = struct.field(pytree_node=False)

  @classmethod
  def create(cls, batch: int, max_length: int, config: NSAConfig,
             num_kv_heads: int, head_dim: int, v_head_dim: int | None = None,
             *, shared_kv: bool = False, max_query_len: int = 1,
             dtype=jnp.float32) -> NSACache:
    """An empty cache of ``max_length`` tokens per row.

    Args:
      batch: B.
      max_length: most tokens a row may hold (prompt and generated).
      config: the layer's NSA hyper-parameters.
      num_kv_heads: Hkv. head_dim: Dk. v_head_dim: Dv, default Dk.
      shared_kv: the layer's branches share one K/V set (no window or
        compression ring buffers).
      max_query_len: most tokens a decode step may take (speculative
        decoding); sizes the ring buffers.
      dtype: of keys and values.
    """
    if not isinstance(config, NSAConfig):
      raise TypeError(f"config must be an NSAConfig, got {type(config)}")
    _check_sizes(batch=batch, max_length=max_length,
                 max_query_len=max_query_len)
    dv = head_dim if v_head_dim is None else v_head_dim
    size = _round_up(max_length, config.sel_block)
    zeros = lambda n, d: jnp.zeros((batch, n, num_kv_heads, d), dtype)
    # Whole selection blocks, so the decode kernel can walk the ring.
    win = min(_round_up(config.window + max_query_len - 1, config.sel_block),
              size)
    cmp_ring = config.cmp_block + max_query_len - 1
    # Whole blocks of 64 tokens, the compressed decode kernel's step.
    tc = _round_up(config.num_compressed(max_length), 64)
    return cls(
        k=zeros(size, head_dim), v=zeros(size, dv),
        k_win=None if shared_kv else zeros(win, head_dim),
        v_win=None if shared_kv else zeros(win, dv),
        k_cmp_raw=None if shared_kv else zeros(cmp_ring, head_dim),
        v_cmp_raw=None if shared_kv else zeros(cmp_ring, dv),
        k_cmp=zeros(tc, head_dim), v_cmp=zeros(tc, dv),
        lengths=jnp.zeros((batch,), jnp.int32), max_length=max_length,
        max_query_len=max_query_len)

  @property
  def shared_kv(self) -> bool:
    return self.k_win is None

  def overflowed(self):
    """bool [B]: rows written past ``max_length`` (only possible under jit)."""
    return self.lengths > self.max_length


def _check_sizes(**sizes):
  for name, value in sizes.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
