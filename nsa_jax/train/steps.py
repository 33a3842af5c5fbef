"""Jit-compiled train and eval steps: masked next-token cross-entropy.

A batch may carry ``segment_ids`` (int32 [B, T], packed documents; see
``nsa_jax.data.PackedIterator``): the model then attends within documents.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import optax


def batch_logits(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """``model(inputs)``, with the batch's segment ids when it has them."""
  segment_ids = batch.get("segment_ids")
  if segment_ids is None:
    return model(batch["inputs"])
  return model(batch["inputs"], segment_ids=segment_ids)


def masked_loss_sum(logits: jax.Array, targets: jax.Array,
                    mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy summed over scored tokens, in float32.

  Args:
    logits: float [B, T, V].
    targets: int32 [B, T].
    mask: float32 [B, T], 1 where a token is scored.

  Returns:
    (loss sum, scored-token count), both float32 scalars.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)  # [B, T]
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def train_step_fn(model: nnx.Module, optimizer: nnx.Optimizer,
                  batch: dict[str, jax.Array], grad_accum: int = 1
                  ) -> dict[str, jax.Array]:
  """One optimizer step on ``batch``, split into ``grad_accum`` micro-batches.

  Gradients of the micro-batches are summed in float32 inside a
  ``lax.scan`` (so memory is that of one micro-batch) and normalised by the
  scored tokens of the whole batch, so the update equals the one on the full
  batch at once.

  Args:
    model: an NNX module, ``model(inputs [b, T]) -> logits [b, T, V]``.
    optimizer: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, updated in place.
    batch: ``inputs``/``targets`` int32 [B, T], ``mask`` float32 [B, T],
      optionally ``segment_ids`` int32 [B, T].
    grad_accum: micro-batches; B must divide by it.

  Returns:
    ``loss`` (mean over scored tokens) and ``grad_norm`` (before clipping).
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  micro = jax.tree.map(
      lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]),
      batch)  # [A, B / A, T]
  count = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)

  def micro_loss(params, mb):
    logits = batch_logits(nnx.merge(graphdef, params, rest), mb)
    loss_sum, _ = masked_loss_sum(logits, mb["targets"], mb["mask"])
    return loss_sum / count

  grad_fn = jax.value_and_grad(micro_loss)

  def accumulate(carry, mb):
    loss, grads = carry
    micro_value, micro_grads = grad_fn(params, mb)
    grads = jax.tree.map(jnp.add, grads, micro_grads)
    return (loss + micro_value, grads), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  if grad_accum == 1:
    loss, grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro))
  else:
    (loss, grads), _ = jax.lax.scan(
        accumulate, (jnp.zeros((), jnp.float32), zeros), micro)
  optimizer.update(model, grads)
  return {"loss": loss, "grad_norm": optax.global_norm(grads)}


# ``train_step_fn`` compiled; ``nsa_jax.parallel.Parallelism`` compiles it
# again for a mesh.
train_step = nnx.jit(train_step_fn, static_argnames=("grad_accum",))


class SplitTrainStep:
  """A train step on the split state of a model and its optimizer.

  ``nnx.jit`` walks the object graph of its module arguments on every call,
  in Python: for a ``gpu-*`` NSA model (459 state arrays) 87 ms a call on a
  development CPU; on the H100 a synchronous step took 105 ms for 72.5 ms
  of kernels, and the host fell behind the device now and then.
  Here the graph is split once; each step is one ``jax.jit`` call on the
  state. The state the optimizer updates (the ``wrt`` parameters and the
  optimizer's own) is donated and replaced; the rest (frozen weights, which
  other objects may share) is passed through untouched.

  The model and optimizer objects are stale between ``sync`` calls (their
  updated arrays were donated: reading one raises "Array has been
  deleted"), so call ``sync`` before evaluating, checkpointing or returning
  them.

  Args:
    model: the NNX module trained.
    optimizer: ``nnx.Optimizer(model, tx, wrt=...)``.
    step_fn: ``step_fn(model, optimizer, batch, **step_kwargs) -> outputs``
      updating both in place: ``train_step_fn`` (default), a wrapper of it
      (``nsa_jax.parallel.Parallelism.train_step_fn`` pins the state to a
      mesh) or another (``nsa_jax.seer.distill.distill_step_fn``).
    **step_kwargs: static keyword arguments of ``step_fn`` (e.g.
      ``grad_accum``).
  """

  def __init__(self, model: nnx.Module, optimizer: nnx.Optimizer, *,
               step_fn=train_step_fn, **step_kwargs):
    self._nodes = (model, optimizer)
    updated = nnx.Any(optimizer.wrt, nnx.OptState)
    graphdef, self._updated, self._rest = nnx.split(self._nodes, updated,
                                                    ...)

    def on_state(updated_state, rest, batch):
      model, optimizer = nnx.merge(graphdef, updated_state, rest)
      out = step_fn(model, optimizer, batch, **step_kwargs)
      _, updated_state, rest = nnx.split((model, optimizer), updated, ...)
      return updated_state, rest, out

    self._step = jax.jit(on_state, donate_argnums=0)

  def __call__(self, batch):
    """One step; returns what ``step_fn`` returns."""
    self._updated, self._rest, out = self._step(self._updated, self._rest,
                                                batch)
    return out

  def sync(self) -> None:
    """Writes the current state into the model and optimizer objects."""
    nnx.update(self._nodes, self._updated, self._rest)


def eval_step_fn(model: nnx.Module, batch: dict[str, jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
  """Summed masked loss and scored-token count of ``batch`` (float32)."""
  logits = batch_logits(model, batch)
  return masked_loss_sum(logits, batch["targets"], batch["mask"])


eval_step = nnx.jit(eval_step_fn)


@nnx.jit
def predict_step(model: nnx.Module, inputs: jax.Array) -> jax.Array:
  """Greedy next tokens: int32 [B, T] -> int32 [B, T]."""
  return jnp.argmax(model(inputs), axis=-1).astype(jnp.int32)
