"""TransformerLM: logits, tying, bf16, causality and a few AdamW steps."""

import dataclasses

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nsa_jax import NSAConfig
from nsa_jax.modules import LMConfig
from nsa_jax.modules import TransformerLM
from nsa_jax.modules.transformer import count_params
from nsa_jax.modules.transformer import match_mlp_hidden

VOCAB = 64


def make_config(**overrides):
  fields = dict(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4,
                num_kv_heads=2, head_dim=8, mlp_hidden=64,
                nsa=NSAConfig.tiny(), impl="xla")
  fields.update(overrides)
  return LMConfig(**fields)


def make_tokens(batch, seq_len, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, VOCAB, (batch, seq_len)), jnp.int32)


forward = nnx.jit(lambda model, tokens: model(tokens))


def num_params(model):
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("attention", ["nsa", "full"])
@pytest.mark.parametrize("tie", [True, False])
def test_logits_shape_dtype_and_embedding_tying(attention, tie):
  config = make_config(attention=attention, tie_embeddings=tie)
  model = TransformerLM(config, rngs=nnx.Rngs(0))
  logits = forward(model, make_tokens(2, 37))
  chex.assert_shape(logits, (2, 37, VOCAB))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  assert hasattr(model, "lm_head") != tie
  untied = TransformerLM(
      make_config(attention=attention, tie_embeddings=False),
      rngs=nnx.Rngs(0))
  extra = 0 if not tie else config.d_model * VOCAB
  assert num_params(model) + extra == num_params(untied)


def test_tied_logits_are_hidden_times_embedding():
  model = TransformerLM(make_config(num_layers=1), rngs=nnx.Rngs(0))
  tokens = make_tokens(1, 20)

  @nnx.jit
  def both(model, tokens):
    x = model.embed(tokens)
    for layer in model.layers:
      x = layer(x)
    hidden = model.final_norm(x)
    return model(tokens), hidden @ model.embed.embedding[...].T

  logits, want = both(model, tokens)
  chex.assert_trees_all_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_bfloat16_runs_with_float32_params_and_logits(attention):
  config = make_config(attention=attention, dtype="bfloat16")
  model = TransformerLM(config, rngs=nnx.Rngs(0))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  tokens = make_tokens(2, 40)
  chex.assert_type(model.embed(tokens), jnp.bfloat16)
  logits = forward(model, tokens)
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  # Same parameters in float32: bf16 logits agree to bf16 accuracy.
  reference = TransformerLM(make_config(attention=attention),
                            rngs=nnx.Rngs(0))
  want = forward(reference, tokens)
  scale = float(jnp.abs(want).max())
  assert float(jnp.abs(logits - want).max()) < 0.05 * scale


def test_nsa_lm_is_causal():
  """Changing tokens from position 30 on leaves logits before 30 unchanged."""
  model = TransformerLM(make_config(num_layers=2), rngs=nnx.Rngs(0))
  tokens = make_tokens(1, 48)
  changed = tokens.at[:, 30:].set((tokens[:, 30:] + 1) % VOCAB)
  before, after = forward(model, tokens), forward(model, changed)
  chex.assert_trees_all_close(before[:, :30], after[:, :30], rtol=1e-5,
                              atol=1e-5)
  assert float(jnp.abs(before[:, 30:] - after[:, 30:]).max()) > 1e-4


def test_rejects_bad_inputs():
  with pytest.raises(TypeError, match="LMConfig"):
    TransformerLM(NSAConfig.tiny(), rngs=nnx.Rngs(0))
  model = TransformerLM(make_config(attention="full"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokens"):
    model(jnp.zeros((2, 8)))
  with pytest.raises(ValueError, match="tokens"):
    model(jnp.zeros((8,), jnp.int32))


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_adamw_steps_reduce_loss_on_a_fixed_batch(attention):
  config = make_config(attention=attention, num_layers=2)
  model = TransformerLM(config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  tokens = make_tokens(2, 49)  # T = 48 inputs: 11 compressed tokens, Ts = 3

  def loss_fn(model):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(train_step(model, optimizer)) for _ in range(10)]
  final = float(nnx.jit(loss_fn)(model))
  assert np.all(np.isfinite(losses))
  assert abs(losses[0] - np.log(VOCAB)) < 0.5  # starts near uniform
  assert final < 0.8 * losses[0], (losses, final)


def test_eager_call_names_a_bad_token_id_and_its_position():
  model = TransformerLM(make_config(attention="full"), rngs=nnx.Rngs(0))
  tokens = make_tokens(2, 12)
  with pytest.raises(ValueError, match=r"token id 64 at position \(1, 7\)"):
    model(tokens.at[1, 7].set(VOCAB))
  with pytest.raises(ValueError, match=r"token id -1 at position \(0, 2\)"):
    model(tokens.at[0, 2].set(-1))


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_out_of_range_ids_under_jit_embed_as_zeros(attention):
  """A bad id poisons nothing: earlier positions are unchanged, all finite."""
  model = TransformerLM(make_config(attention=attention), rngs=nnx.Rngs(0))
  tokens = make_tokens(1, 40)
  bad = tokens.at[0, 20].set(VOCAB + 5).at[0, 30].set(-1)
  clean, logits = forward(model, tokens), forward(model, bad)
  chex.assert_tree_all_finite(logits)
  chex.assert_trees_all_close(logits[:, :20], clean[:, :20], rtol=1e-5,
                              atol=1e-5)
  # -1 is not read as vocab_size - 1: both bad ids mean a zero embedding.
  wrapped = forward(model, bad.at[0, 30].set(VOCAB - 1))
  assert float(jnp.abs(wrapped[:, 30] - logits[:, 30]).max()) > 1e-4
  zeros = nnx.jit(lambda m, t: m._embed(t))(model, bad)  # pylint: disable=protected-access
  assert float(jnp.abs(zeros[0, 20]).max()) == 0.0
  assert float(jnp.abs(zeros[0, 30]).max()) == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("vocab", [VOCAB, 1500])  # one-hot, then gather
def test_embedding_equals_the_table_rows_and_their_gradient(dtype, vocab):
  # Small vocabularies embed by one-hot matmul (a matmul gradient, not a
  # colliding scatter): the same values as a gather, bit for bit, and the
  # same table gradient; ids outside the vocabulary embed as zeros.
  model = TransformerLM(make_config(vocab_size=vocab, dtype=dtype),
                        rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 5, (2, 33)), jnp.int32)  # repeats
  tokens = tokens.at[0, 3].set(vocab).at[1, 7].set(-1)
  weight = jnp.asarray(rng.normal(size=(2, 33, 32)), jnp.float32)
  table = model.embed.embedding[...]

  def gathered(table):
    valid = (tokens >= 0) & (tokens < vocab)
    rows = table.astype(model.embed.dtype)[jnp.where(valid, tokens, 0)]
    return jnp.where(valid[..., None], rows, 0)

  embedded = nnx.jit(lambda m: m._embed(tokens))  # pylint: disable=protected-access
  got, want = embedded(model), jax.jit(gathered)(table)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))
  assert not np.asarray(got[0, 3], np.float32).any()
  # The table's gradient: the weights summed per valid id (exact in
  # float32); bfloat16 rounds each cotangent (the gather path also sums in
  # bfloat16).
  loss = lambda x: jnp.sum(x.astype(jnp.float32) * weight)
  got = nnx.jit(nnx.grad(lambda m: loss(m._embed(tokens))))(model)  # pylint: disable=protected-access
  valid = np.asarray((tokens >= 0) & (tokens < vocab))
  want = np.zeros(table.shape, np.float32)
  np.add.at(want, np.asarray(tokens)[valid], np.asarray(weight)[valid])
  tol = 1e-5 if dtype == "float32" else 0.1
  np.testing.assert_allclose(got.embed.embedding[...], want, rtol=tol,
                             atol=tol)


def _loss_and_grads(config, tokens):
  model = TransformerLM(config, rngs=nnx.Rngs(0))

  def loss_fn(model):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  return loss, nnx.to_pure_dict(grads)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_remat_keeps_loss_and_gradients(attention):
  tokens = make_tokens(2, 41)
  base = make_config(attention=attention, num_layers=2)
  loss, grads = _loss_and_grads(base, tokens)
  for remat in ("block", "dots"):  # one baseline for both
    loss_r, grads_r = _loss_and_grads(
        make_config(attention=attention, num_layers=2, remat=remat), tokens)
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6,
                               err_msg=remat)
    chex.assert_trees_all_close(grads_r, grads, rtol=1e-5, atol=1e-7,
                                custom_message=remat)


def test_remat_recomputes_blocks_in_the_backward_pass():
  """The jaxpr of the gradient holds one checkpoint (remat) per block."""
  tokens = make_tokens(1, 17)

  def remat_count(remat):
    model = TransformerLM(make_config(attention="full", num_layers=3,
                                      remat=remat), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    loss = lambda p: nnx.merge(graphdef, p)(tokens).sum()
    return str(jax.make_jaxpr(jax.grad(loss))(params)).count("remat")

  assert remat_count("none") == 0
  assert remat_count("block") >= 3


def test_gate_and_remat_options_are_validated():
  with pytest.raises(ValueError, match="remat='all'"):
    make_config(remat="all")
  with pytest.raises(ValueError, match="gate='conv'"):
    make_config(gate="conv")
  with pytest.raises(ValueError, match="gate_hidden"):
    make_config(gate="mlp", gate_hidden=0)


def test_mlp_gate_through_lm_config():
  linear = TransformerLM(make_config(), rngs=nnx.Rngs(0))
  mlp = TransformerLM(make_config(gate="mlp", gate_hidden=12),
                      rngs=nnx.Rngs(0))
  attn = mlp.layers[0].attn
  assert attn.gate == "mlp" and attn.gate_hidden_proj.out_features == 12
  assert linear.layers[0].attn.gate == "linear"
  d, hq = 32, 4
  extra = (d * 12 + 12) + (12 * 3 * hq) - (d * 3 * hq)
  assert num_params(mlp) == num_params(linear) + extra
  logits = forward(mlp, make_tokens(2, 30))
  chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("overrides", [
    dict(attention="full"), dict(attention="nsa"),
    dict(attention="nsa", shared_kv=True, gate="mlp"),
    dict(attention="nsa", compression="mean", tie_embeddings=False)])
def test_count_params_counts_the_built_model(overrides):
  config = make_config(**overrides)
  model = TransformerLM(config, rngs=nnx.Rngs(0))
  assert count_params(config) == num_params(model)


def test_match_mlp_hidden_brings_full_nearest_to_nsa():
  nsa = make_config(attention="nsa", num_layers=2)
  full = make_config(attention="full", num_layers=2)
  target = count_params(nsa)
  assert count_params(full) < target  # per-branch K/V, compressors, gates
  matched = match_mlp_hidden(full, target, multiple=8)
  assert matched.mlp_hidden % 8 == 0
  gap = abs(count_params(matched) - target)
  for other in (matched.mlp_hidden - 8, matched.mlp_hidden + 8):
    assert gap <= abs(count_params(
        make_config(attention="full", num_layers=2, mlp_hidden=other))
        - target)
  assert dataclasses.replace(matched, mlp_hidden=full.mlp_hidden) == full


class _Recorder(nnx.Module):
  """Stands in for a layer's attention and keeps the input it was given."""

  def __init__(self, attn):
    self.attn = attn
    self.seen = nnx.data(None)

  def __call__(self, x, *args, **kwargs):
    self.seen = x
    return self.attn(x, *args, **kwargs)


def test_attention_input_is_what_the_layer_sees_in_the_forward():
  model = TransformerLM(make_config(num_layers=3), rngs=nnx.Rngs(0))
  tokens = make_tokens(1, 40)
  for index in range(3):
    want = model.attention_input(tokens, index)
    model.layers[index].attn = _Recorder(model.layers[index].attn)
    model(tokens)
    chex.assert_trees_all_close(model.layers[index].attn.seen, want,
                                rtol=1e-6, atol=1e-6)
    model.layers[index].attn = model.layers[index].attn.attn
  with pytest.raises(ValueError, match="layer=3"):
    model.attention_input(tokens, 3)
