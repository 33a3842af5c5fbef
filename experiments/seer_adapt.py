"""SeerAttention-R on a model trained here: distil gates, decode sparsely.

  python experiments/seer_adapt.py                    # CPU, a few minutes
  python experiments/seer_adapt.py --preset gpu-32k   # one H100
  python experiments/seer_adapt.py --preset gpu-32k --until train  # split

Trains (or continues, or reuses) a full-attention LM on the code corpus with
passkey rows, distils one AttnGate per layer against its own attention, and
reports gated sparse decoding at token budgets of 1/16, 1/8, 1/4 of the
context against dense decoding: perplexity, passkey retrieval, gate recall,
decode speed (``<workdir>/seer_summary.md``, ``seer_results.json``,
``seer_budgets.png``). The logic lives in ``nsa_jax.seer.adapt``.
"""

from __future__ import annotations

from nsa_jax.seer import adapt

if __name__ == "__main__":
  adapt.run()
