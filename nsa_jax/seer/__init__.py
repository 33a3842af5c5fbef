"""SeerAttention-R (arXiv 2506.08889): learned block-sparse decoding.

A frozen full-attention ``TransformerLM`` gets one ``AttnGate`` per layer
(``SeerGates``), trained by self-distillation (``nsa_jax.seer.distill``)
against the block target of its own attention (``attention_oracle``);
``SeerLM`` then decodes reading only the blocks the gates pick
(``Selection``: a token budget or a threshold), through the block-sparse
decode kernel NSA uses. ``experiments/seer_adapt.py``
(``nsa_jax.seer.adapt``) runs it end to end.
"""

from nsa_jax.seer.config import SeerConfig
from nsa_jax.seer.config import Selection
from nsa_jax.seer.decode import SeerCache
from nsa_jax.seer.gate import AttnGate
from nsa_jax.seer.gate import SeerGates
from nsa_jax.seer.model import GATE_PARAMS
from nsa_jax.seer.model import SeerLM
from nsa_jax.seer.oracle import attention_oracle
from nsa_jax.seer.select import select_blocks

__all__ = ["GATE_PARAMS", "AttnGate", "SeerCache", "SeerConfig", "SeerGates",
           "SeerLM", "Selection", "attention_oracle", "select_blocks"]
