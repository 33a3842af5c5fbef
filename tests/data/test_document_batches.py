"""Packed code batches with document ids, and the train step that uses them."""

from flax import nnx
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nsa_jax import data
from nsa_jax.modules.transformer import LMConfig
from nsa_jax.modules.transformer import TransformerLM
from nsa_jax.train import cli
from nsa_jax.train import steps

from nsa_cases import TINY


def _stream():
  docs = [b"alpha beta", b"x", b"gamma delta epsilon", b"zeta eta theta"]
  return np.tile(data.tokenizer.encode_documents(docs), 4)


def test_document_ids_start_at_each_separator():
  tokens = np.array([[5, 6, 0, 7, 0, 0, 8], [0, 1, 2, 3, 4, 5, 6]])
  np.testing.assert_array_equal(
      data.document_ids(tokens),
      [[0, 0, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1]])


def test_packed_batches_carry_document_ids():
  it = data.PackedIterator(_stream(), 2, 24, seed=1, documents=True)
  batch = it.batch_at(3)
  np.testing.assert_array_equal(batch["segment_ids"],
                                data.document_ids(batch["inputs"]))
  assert batch["segment_ids"].dtype == np.int32
  # Same windows and losses as without documents.
  plain = data.PackedIterator(_stream(), 2, 24, seed=1).batch_at(3)
  assert set(plain) == {"inputs", "targets", "mask"}
  for key in plain:
    np.testing.assert_array_equal(batch[key], plain[key])
  evals = data.eval_batches(_stream(), 2, 24, 2, documents=True)
  np.testing.assert_array_equal(evals[1]["segment_ids"],
                                data.document_ids(evals[1]["inputs"]))


def test_state_names_documents_only_when_on():
  plain = data.PackedIterator(_stream(), 2, 24)
  assert "documents" not in plain.state()  # old saved states still fit
  docs = data.PackedIterator(_stream(), 2, 24, documents=True)
  with pytest.raises(ValueError, match="documents"):
    docs.restore(plain.state())


def test_mixed_rows_get_their_own_ids():
  base = data.PackedIterator(np.tile(_stream(), 4), 3, 128, documents=True)
  extra = data.SyntheticIterator("passkey", 1, 128)
  batch = data.MixedIterator(base, extra, 1).batch_at(0)
  np.testing.assert_array_equal(batch["inputs"][0],
                                extra.batch_at(0)["inputs"][0])
  np.testing.assert_array_equal(batch["segment_ids"][0], 0)
  np.testing.assert_array_equal(batch["segment_ids"],
                                data.document_ids(batch["inputs"]))


def test_steps_hand_the_ids_to_the_model():
  seen = []

  def model(inputs, **kwargs):
    seen.append(sorted(kwargs))
    return jnp.zeros((*inputs.shape, 4))

  batch = {"inputs": jnp.zeros((1, 3), jnp.int32)}
  steps.batch_logits(model, batch)
  steps.batch_logits(model, {**batch, "segment_ids": batch["inputs"]})
  assert seen == [[], ["segment_ids"]]


def test_train_step_with_document_ids():
  config = LMConfig(vocab_size=256, d_model=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=8, mlp_hidden=32, nsa=TINY,
                    attention="full", impl="xla")
  model = TransformerLM(config, rngs=nnx.Rngs(0))
  batch = data.PackedIterator(_stream(), 4, 24, documents=True).batch_at(0)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  out = steps.train_step(model, optimizer, batch, grad_accum=2)
  assert np.isfinite(float(out["loss"]))


def test_documents_flag():
  plan = cli.resolve(*cli.parse(["--documents"]))
  assert plan.data["documents"] is True
  assert cli.resolve(*cli.parse([])).data["documents"] is False
  with pytest.raises(SystemExit):
    cli.resolve(*cli.parse(["--documents", "--data", "passkey"]))
