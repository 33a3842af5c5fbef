"""NSAConfig and LMConfig reject every bad value with a ValueError naming it."""

import dataclasses

import pytest

from nsa_jax import NSAConfig
from nsa_jax import ops
from nsa_jax.modules import LMConfig

# (overrides of NSAConfig.tiny(), a regex the message must contain).
NSA_VIOLATIONS = [
    *[({name: 2.0}, rf"NSAConfig\.{name} must be an int")
      for name in ("cmp_block", "cmp_stride", "sel_block", "num_selected",
                   "num_initial", "num_local", "window")],
    ({"window": True}, r"NSAConfig\.window must be an int"),
    *[({name: 0}, rf"NSAConfig\.{name} must be >= 1")
      for name in ("cmp_block", "cmp_stride", "sel_block", "num_selected",
                   "window")],
    ({"num_initial": -1}, r"NSAConfig\.num_initial must be >= 0"),
    ({"num_local": -1}, r"NSAConfig\.num_local must be >= 0"),
    ({"cmp_block": 6}, r"NSAConfig\.cmp_block=6 must be a multiple of "
                       r"cmp_stride=4"),
    ({"cmp_stride": 8, "cmp_block": 16, "sel_block": 20},
     r"NSAConfig\.cmp_stride=8 must divide sel_block=20"),
    ({"sel_block": 4}, r"NSAConfig\.sel_block=4 must be >= cmp_block=8"),
    ({"num_selected": 2}, r"NSAConfig\.num_selected=2 must be >= "
                          r"num_initial \+ num_local = 3"),
]


@pytest.mark.parametrize("overrides,message", NSA_VIOLATIONS)
def test_nsa_config_violation_names_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(NSAConfig.tiny(), **overrides)


def test_nsa_config_presets_and_counts():
  assert NSAConfig.paper() == NSAConfig()
  paper = NSAConfig.paper()
  assert (paper.cmp_block, paper.cmp_stride, paper.sel_block,
          paper.num_selected, paper.window) == (32, 16, 64, 16, 512)
  tiny = NSAConfig.tiny()
  hash(tiny)  # usable as a jit static
  for seq_len in range(1, 70):
    assert tiny.num_compressed(seq_len) == max(0, (seq_len - 8) // 4 + 1)
    assert tiny.num_selection_blocks(seq_len) == -(-seq_len // 16)
  # Boundary values that are allowed.
  NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, num_selected=1,
            num_initial=0, num_local=1, window=1)
  NSAConfig(num_selected=3, num_initial=0, num_local=0)


LM_VIOLATIONS = [
    *[({name: 0}, rf"LMConfig\.{name} must be a positive int")
      for name in ("vocab_size", "d_model", "num_layers", "num_heads",
                   "num_kv_heads", "head_dim")],
    ({"d_model": 32.0}, r"LMConfig\.d_model must be a positive int"),
    ({"num_layers": True}, r"LMConfig\.num_layers must be a positive int"),
    ({"v_head_dim": 0}, r"LMConfig\.v_head_dim must be None or a positive"),
    ({"mlp_hidden": -4}, r"LMConfig\.mlp_hidden must be None or a positive"),
    ({"mlp_hidden": 64.0}, r"LMConfig\.mlp_hidden must be None or a positive"),
    ({"num_heads": 4, "num_kv_heads": 3},
     r"LMConfig\.num_heads=4 must be a multiple of num_kv_heads=3"),
    ({"head_dim": 7}, r"LMConfig\.head_dim=7 must be even"),
    ({"attention": "linear"}, r"LMConfig\.attention='linear'"),
    ({"attention": "full", "v_head_dim": 12},
     r"LMConfig\.v_head_dim must equal head_dim"),
    ({"nsa": {"cmp_block": 8}}, r"LMConfig\.nsa must be an NSAConfig"),
    ({"compression": "max"}, r"LMConfig\.compression='max'"),
    ({"impl": "triton"}, r"LMConfig\.impl='triton'"),
    ({"dtype": "float16"}, r"LMConfig\.dtype='float16'"),
]


@pytest.mark.parametrize("overrides,message", LM_VIOLATIONS)
def test_lm_config_violation_names_the_field(overrides, message):
  base = LMConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=8, nsa=NSAConfig.tiny())
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(base, **overrides)


# Values that break the model but pass LMConfig.__post_init__ today.
@pytest.mark.parametrize("overrides,field", [
    ({"v_head_dim": True}, "v_head_dim"),
    ({"mlp_hidden": True}, "mlp_hidden"),
    ({"rope_base": 0.0}, "rope_base"),
    ({"norm_eps": -1.0}, "norm_eps"),
])
def test_lm_config_unchecked_values(overrides, field):
  with pytest.raises(ValueError, match=rf"LMConfig\.{field}"):
    LMConfig(**overrides)


def test_lm_config_accepts_valid_variants_and_hidden_width():
  base = LMConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8)
  assert base.hidden == 128  # 8/3 * 32 = 85.3, rounded up to 64s
  assert LMConfig(d_model=256).hidden == 704
  assert dataclasses.replace(base, mlp_hidden=48).hidden == 48
  dataclasses.replace(base, attention="full", v_head_dim=8)
  dataclasses.replace(base, v_head_dim=12, shared_kv=True,
                      compression="mean", dtype="bfloat16", impl="reference")


@pytest.mark.parametrize("impl", ["triton", "AUTO", "", None])
def test_bad_impl_string_raises(impl):
  with pytest.raises(ValueError, match="impl"):
    ops.resolve_impl(impl)


def test_good_impls_resolve():
  assert ops.resolve_impl("xla") == "xla"
  assert ops.resolve_impl("reference") == "reference"
  assert ops.resolve_impl("auto") in ("xla", "pallas")
