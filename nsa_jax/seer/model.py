"""SeerLM: a trained full-attention TransformerLM plus one AttnGate a layer."""

from __future__ import annotations

from flax import nnx
import jax.numpy as jnp

from nsa_jax import ops
from nsa_jax.decode import cache as cache_lib
from nsa_jax.decode import layers as layers_lib
from nsa_jax.modules.rope import apply_rope
from nsa_jax.modules.transformer import TransformerLM
from nsa_jax.seer import decode as decode_lib
from nsa_jax.seer.config import Selection
from nsa_jax.seer.gate import SeerGates
from nsa_jax.seer.select import select_blocks
from nsa_jax.validation import IMPLS

# The gates' parameters: what distillation trains, ``wrt`` of its optimizer.
GATE_PARAMS = nnx.All(nnx.Param, nnx.PathContains("gates"))


class SeerLM(nnx.Module):
  """A frozen full-attention LM whose decoding reads the blocks its gates pick.

  ``model`` is not changed by anything here: the gates are separate
  parameters (``GATE_PARAMS``). With a ``selection``:

  - ``__call__(tokens)`` gives the logits of sparse decoding at every
    position at once: each query reads, through ``ops.selected_attention``,
    exactly the blocks a decode step at its position would read (the gate
    scores, block 0 and its own block). Teacher-forced perplexity and
    greedy predictions of sparse decoding come from here.
  - ``init_cache`` / ``prefill`` / ``decode_step``: dense prefill, then
    gated block-sparse decode steps (``nsa_jax.seer.decode``); so
    ``nsa_jax.decode.generate`` runs on a SeerLM as on a TransformerLM.

  Attributes:
    model: the TransformerLM (``attention="full"``).
    gates: its SeerGates.
    selection: which blocks a query reads (None: only distillation).
    impl: attention implementation of the sparse paths (see
      ``nsa_jax.ops``; "auto": the Pallas kernels on a GPU).
  """

  def __init__(self, model: TransformerLM, gates: SeerGates,
               selection: Selection | None = None, *, impl: str = "auto"):
    if not isinstance(model, TransformerLM):
      raise TypeError(f"model must be a TransformerLM, got {type(model)}")
    if not isinstance(gates, SeerGates):
      raise TypeError(f"gates must be SeerGates, got {type(gates)}")
    if model.config.attention != "full":
      raise ValueError(f"SeerLM needs a full-attention model, got "
                       f"attention={model.config.attention!r}")
    if len(gates.layers) != len(model.layers):
      raise ValueError(f"{len(gates.layers)} gates for "
                       f"{len(model.layers)} layers")
    if selection is not None:
      if not isinstance(selection, Selection):
        raise TypeError(f"selection must be a Selection, got {selection!r}")
      # A budget below two blocks is refused now, not at the first call.
      selection.num_slots(gates.config.block_size, 2)
    if impl not in IMPLS:
      raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    self.model, self.gates = model, gates
    self.selection, self.impl = selection, impl

  @property
  def config(self):
    """The model's LMConfig (``generate`` and ``evaluate`` read it)."""
    return self.model.config

  @property
  def block_size(self) -> int:
    return self.gates.config.block_size

  def with_selection(self, selection: Selection) -> SeerLM:
    """A SeerLM sharing this one's model and gates, reading ``selection``."""
    return SeerLM(self.model, self.gates, selection, impl=self.impl)

  def _selection(self) -> Selection:
    if self.selection is None:
      raise ValueError("this SeerLM has no selection: make one with "
                       "with_selection(Selection(budget=...))")
    return self.selection

  def __call__(self, tokens):
    """Logits of gated sparse decoding at every position.

    Args:
      tokens: int [B, T].

    Returns:
      float32 logits [B, T, vocab].
    """
    selection = self._selection()
    b = self.block_size
    t = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)

    def attend(index, attn, x, state):
      q, k, v = layers_lib.full_qkv(attn, x)
      probs = jnp.exp(self.gates.layers[index](q, k))  # [B, T, Hkv, T // b]
      table = select_blocks(probs, positions, selection, b, -(-t // b))
      out = ops.selected_attention(
          apply_rope(q, positions, attn.rope_base),
          apply_rope(k, positions, attn.rope_base), v, table, block_size=b,
          impl=self.impl)
      return attn.out_proj(out.reshape(*x.shape[:2], -1)), state

    return layers_lib.run_layers(self.model, tokens,
                                 (None,) * len(self.model.layers), attend)[0]

  def init_cache(self, batch: int, max_length: int, *,
                 max_query_len: int = 1):
    """One empty SeerCache per layer (a tuple); one token a decode step."""
    if max_query_len != 1:
      raise ValueError(f"SeerAttention-R decodes one token a step, got "
                       f"max_query_len={max_query_len}")
    return tuple(decode_lib.init_cache(layer.attn, gate, batch, max_length)
                 for layer, gate in zip(self.model.layers, self.gates.layers))

  def prefill(self, tokens, caches, lengths=None):
    """Dense prefill: tokens int [B, T] -> (logits [B, T, vocab], caches)."""
    return layers_lib.run_layers(
        self.model, tokens, caches,
        lambda i, attn, x, cache: decode_lib.prefill(
            attn, self.gates.layers[i], x, cache, lengths))

  def decode_step(self, tokens, caches):
    """Gated sparse step: tokens int [B, 1] -> (logits [B, 1, vocab], caches).
    """
    selection = self._selection()
    if tokens.ndim != 2 or tokens.shape[1] != 1:
      raise ValueError(f"SeerAttention-R decodes one token a step: tokens "
                       f"must be [B, 1], got {tokens.shape}")
    if isinstance(caches, (tuple, list)) and caches:  # before any compute
      cache_lib.check_capacity(caches[0].lengths, 1, caches[0].max_length,
                               "decode_step")
    return layers_lib.run_layers(
        self.model, tokens, caches,
        lambda i, attn, x, cache: decode_lib.decode_step(
            attn, self.gates.layers[i], x, cache, selection, impl=self.impl))
