"""The gated merge of a decode step's splits: kernel against plain JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_merge

Branch = decode_merge.Branch


def _parts(b, hkv, splits, group_p, dv, seed=0):
  """Random partials per source; some splits empty (lse -inf, o 0), and in
  row 0, kv head 0 every split of source 0 empty."""
  rng = np.random.default_rng(seed)
  parts = []
  for s in splits:
    o = rng.normal(size=(b, hkv, s, group_p, dv)).astype(np.float32)
    lse = rng.normal(size=(b, hkv, s, group_p)).astype(np.float32) * 3
    empty = rng.random((b, hkv, s, group_p)) < 0.3
    lse[empty] = -np.inf
    o[empty] = 0.0
    parts.append([o, lse])
  parts[0][1][0, 0] = -np.inf
  parts[0][0][0, 0] = 0.0
  gates = rng.random((b, hkv, group_p, 4)).astype(np.float32)
  return [tuple(map(jnp.asarray, p)) for p in parts], jnp.asarray(gates)


# (B, Hkv, splits per source, Gp, Dv, branches); NSA's shape: the compressed
# splits, then one launch holding the selected and window splits.
CASES = [
    (1, 2, (4, 3), 16, 16, ((0, 0, 4), (1, 0, 2), (1, 2, 1))),
    (3, 1, (2, 24), 16, 32, ((0, 0, 2), (1, 0, 16), (1, 16, 8))),
    (2, 4, (1,), 4, 8, ((0, 0, 1),)),
]


@pytest.mark.parametrize("b,hkv,splits,group_p,dv,branches", CASES)
@pytest.mark.parametrize("tile", [4096, 32])  # 32: several loads a branch
def test_interpret_mode_equals_plain_jax(b, hkv, splits, group_p, dv,
                                         branches, tile, monkeypatch):
  monkeypatch.setattr(decode_merge, "_TILE", tile)
  parts, gates = _parts(b, hkv, splits, group_p, dv)
  got = decode_merge.gated_merge(parts, branches, gates, dtype=jnp.float32,
                                 interpret=True)
  want = decode_merge.gated_merge_reference(parts, branches, gates,
                                            dtype=jnp.float32)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
  # A branch whose splits are all empty adds exactly nothing.
  alone = decode_merge.gated_merge(parts, branches[:1], gates,
                                   dtype=jnp.float32, interpret=True)
  assert not np.asarray(alone[0, 0]).any()
  assert np.isfinite(np.asarray(got)).all()


def test_bfloat16_output_is_the_rounded_float32_result():
  parts, gates = _parts(2, 2, (4, 3), 16, 16)
  branches = CASES[0][-1]
  got = decode_merge.gated_merge(parts, branches, gates, dtype=jnp.bfloat16,
                                 interpret=True)
  want = decode_merge.gated_merge_reference(parts, branches, gates,
                                            dtype=jnp.float32)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2,
                             atol=1e-2)


@pytest.mark.parametrize("branches,gates_width,match", [
    (((0, 0, 3),), 4, "power of two"),
    (((0, 2, 4),), 4, "within"),
    (((2, 0, 1),), 4, "names no partials"),
    (((0, 0, 1), (1, 0, 1), (1, 1, 1)), 2, "gates.shape"),
])
def test_bad_branches_and_gates_are_clear_errors(branches, gates_width,
                                                 match):
  parts, gates = _parts(1, 2, (4, 3), 16, 16)
  with pytest.raises(ValueError, match=match):
    decode_merge.gated_merge(parts, branches, gates[..., :gates_width],
                             dtype=jnp.float32, interpret=True)


def test_mismatched_partials_are_a_clear_error():
  parts, gates = _parts(1, 2, (4, 3), 16, 16)
  o, lse = parts[1]
  with pytest.raises(ValueError, match="must be"):
    decode_merge.gated_merge([parts[0], (o[..., :8], lse)], ((0, 0, 4),),
                             gates, dtype=jnp.float32, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton(dtype):
  parts, gates = _parts(16, 4, (4, 24), 16, 128)
  branches = ((0, 0, 4), (1, 0, 16), (1, 16, 8))
  text = jax.jit(lambda p, g: decode_merge.gated_merge(
      p, branches, g, dtype=dtype, interpret=False)).trace(
          parts, gates).lower(lowering_platforms=("cuda",)).as_text()
  assert "decode_gated_merge" in text
