"""Input checks for nsa_jax.ops: readable errors before anything is traced."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.config import NSAConfig

IMPLS = ("auto", "pallas", "xla", "reference")


def check_impl(impl):
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


def check_float(**arrays):
  for name, x in arrays.items():
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise TypeError(f"{name} must be a floating-point array, got dtype "
                      f"{jnp.result_type(x)}")


def check_rank4(**arrays):
  for name, x in arrays.items():
    if jnp.ndim(x) != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, dim], got shape "
                       f"{jnp.shape(x)}")


def check_attention(q, k, v, *, k_name="k", v_name="v", same_length=True):
  """Checks q [B,T,Hq,Dk], k [B,S,Hkv,Dk], v [B,S,Hkv,Dv] agree.

  Args:
    same_length: also require S == T (raw keys of the same sequence).
  """
  check_rank4(q=q, **{k_name: k, v_name: v})
  check_float(q=q, **{k_name: k, v_name: v})
  if not q.shape[0] == k.shape[0] == v.shape[0]:
    raise ValueError(f"{q.shape=}, {k_name}.shape={k.shape} and "
                     f"{v_name}.shape={v.shape} disagree on batch")
  if k.shape[1] != v.shape[1]:
    raise ValueError(f"{k_name}.shape={k.shape} and {v_name}.shape={v.shape} "
                     "disagree on sequence length")
  if same_length and q.shape[1] != k.shape[1]:
    raise ValueError(f"{q.shape=} and {k_name}.shape={k.shape} disagree on "
                     "sequence length")
  if k.shape[2] != v.shape[2]:
    raise ValueError(f"{k_name}.shape={k.shape} and {v_name}.shape={v.shape} "
                     "disagree on kv heads")
  check_heads_and_dims(q, k, v, k_name=k_name, v_name=v_name)


def check_heads_and_dims(q, k, v, *, k_name="k", v_name="v"):
  """Hkv >= 1, Hq a positive multiple of it, Dk (shared by q, k), Dv >= 1."""
  if k.shape[2] < 1:
    raise ValueError(f"{k_name} has Hkv={k.shape[2]} kv heads "
                     f"({k_name}.shape={k.shape}); need at least one")
  if q.shape[2] < 1 or q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads Hq={q.shape[2]} must be a positive "
                     f"multiple of kv heads Hkv={k.shape[2]} ({q.shape=}, "
                     f"{k_name}.shape={k.shape})")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"{q.shape=} and {k_name}.shape={k.shape} disagree on "
                     "the key head dim Dk")
  if q.shape[3] < 1:
    raise ValueError(f"the key head dim Dk={q.shape[3]} must be >= 1 "
                     f"({q.shape=})")
  if v.shape[3] < 1:
    raise ValueError(f"the value head dim Dv={v.shape[3]} must be >= 1 "
                     f"({v_name}.shape={v.shape})")


def check_positive_int(**values):
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


def is_offset(q_offset) -> bool:
  """Whether a query offset was given: anything but the int 0."""
  return not (isinstance(q_offset, int) and q_offset == 0)


def check_q_offset(q_offset):
  """An int or int scalar array >= 0; returns its value, None if traced.

  A query offset places q's rows at positions ``q_offset + r`` of a longer
  sequence (context parallelism: one shard's queries).
  """
  if isinstance(q_offset, bool) or not (isinstance(q_offset, int) or (
      jnp.ndim(q_offset) == 0 and jnp.issubdtype(jnp.result_type(q_offset),
                                                 jnp.integer))):
    raise TypeError(f"q_offset must be an int or an integer scalar, got "
                    f"{q_offset!r}")
  try:
    value = int(np.asarray(q_offset))
  except jax.errors.TracerArrayConversionError:
    return None
  if value < 0:
    raise ValueError(f"q_offset={value} must be >= 0")
  return value


def check_compressed(q, k_cmp, block_size, stride, q_offset=0):
  """l must be a multiple of d, and k_cmp hold Tc = max(0, (T-l)//d + 1).

  With a query offset o, k_cmp holds the tokens of a sequence of at least
  o + T positions: Tc >= max(0, (o + T - l)//d + 1) where o is concrete.
  """
  check_positive_int(block_size=block_size, stride=stride)
  if block_size % stride:
    raise ValueError(f"block_size={block_size} (l) must be a multiple of "
                     f"stride={stride} (d), as NSAConfig requires")
  seq_len = q.shape[1]
  if is_offset(q_offset):
    # A traced offset is >= 0: the queries reach at least position T - 1.
    offset = check_q_offset(q_offset) or 0
    reach = max(0, (offset + seq_len - block_size) // stride + 1)
    if k_cmp.shape[1] < reach:
      raise ValueError(
          f"k_cmp has {k_cmp.shape[1]} compressed tokens but queries up to "
          f"position {offset + seq_len - 1} (block_size={block_size}, "
          f"stride={stride}) see {reach}")
    return
  expected = max(0, (seq_len - block_size) // stride + 1)
  if k_cmp.shape[1] != expected:
    raise ValueError(
        f"k_cmp has {k_cmp.shape[1]} compressed tokens but T={seq_len}, "
        f"block_size={block_size}, stride={stride} give "
        f"(T - l) // d + 1 = {expected}")


def check_key_length(q, k, q_offset):
  """Keys cover the queries: S >= q_offset + T (a traced offset: S >= T)."""
  offset = check_q_offset(q_offset) or 0
  if k.shape[1] < offset + q.shape[1]:
    raise ValueError(
        f"queries up to position {offset + q.shape[1] - 1} need at least "
        f"{offset + q.shape[1]} keys, got k.shape={k.shape}")


def check_segment_ids(segment_ids, q):
  """segment_ids must be None or int [B, T], q's first two dims (q may be
  the queries [B, T, H, D] or a layer's input [B, T, d_model])."""
  if segment_ids is None:
    return
  if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
    raise TypeError("segment_ids must be an integer array, got dtype "
                    f"{jnp.result_type(segment_ids)}")
  if jnp.shape(segment_ids) != tuple(q.shape[:2]):
    raise ValueError(f"segment_ids.shape={jnp.shape(segment_ids)} must be "
                     f"[B, T] = {list(q.shape[:2])}")


def check_block_indices(block_indices, q, k, num_selected=None):
  """block_indices must be int [B, T, Hkv, n]."""
  shape = jnp.shape(block_indices)
  if not jnp.issubdtype(jnp.result_type(block_indices), jnp.integer):
    raise TypeError("block_indices must be an integer array, got dtype "
                    f"{jnp.result_type(block_indices)}")
  want = (q.shape[0], q.shape[1], k.shape[2])
  if len(shape) != 4 or shape[:3] != want:
    raise ValueError(f"block_indices.shape={shape} must be [B, T, Hkv, n] = "
                     f"[{want[0]}, {want[1]}, {want[2]}, n]")
  if num_selected is not None and shape[3] != num_selected:
    raise ValueError(f"block_indices.shape={shape} has {shape[3]} slots but "
                     f"config.num_selected={num_selected}")


def check_config(config):
  if not isinstance(config, NSAConfig):
    raise TypeError(f"config must be an nsa_jax.NSAConfig, got "
                    f"{type(config).__name__}")


def check_gates(gates, q):
  check_float(gates=gates)
  want = (*q.shape[:3], 3)
  if jnp.shape(gates) != want:
    raise ValueError(f"gates.shape={jnp.shape(gates)} must be [B, T, Hq, 3] "
                     f"= {list(want)}")


def check_lse(lse, q):
  check_float(lse=lse)
  if jnp.shape(lse) != q.shape[:3]:
    raise ValueError(f"lse.shape={jnp.shape(lse)} must be [B, T, Hq] = "
                     f"{list(q.shape[:3])}")
