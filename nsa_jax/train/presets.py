"""Named run presets of ``experiments/train_lm.py``: flag values by name.

A preset maps flag destinations (``LMConfig`` fields, ``NSAConfig`` fields
prefixed ``nsa_``, ``TrainConfig`` fields and the data settings of
``DATA_DEFAULTS``) to values; flags given on the command line win.
"""

from __future__ import annotations

from typing import Any

DATA_DEFAULTS: dict[str, Any] = {
    "data": "code", "passkey_rows": 0, "corpus_dir": "",
    "max_corpus_bytes": 0, "val_fraction": 0.05, "documents": False,
}

_CPU_DEMO = {
    "d_model": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
    "head_dim": 32, "mlp_hidden": 384, "dtype": "float32",
    "nsa_cmp_block": 16, "nsa_cmp_stride": 8, "nsa_sel_block": 32,
    "nsa_num_selected": 4, "nsa_window": 64,
    "steps": 200, "batch_size": 4, "seq_len": 512, "lr": 3e-3,
    "warmup_steps": 20, "log_every": 5, "eval_every": 25, "eval_batches": 2,
    "ckpt_every": 100, "max_corpus_bytes": 4_000_000,
}


# The GPU presets' time budget. Every one trains B x T = 65,536 tokens per
# step for 400 steps: 26.2M tokens per model, so tokens/s and peak memory
# compare across T at equal work. On one H100 that assumes NSA at >= 200k
# tok/s (measured 260-300k at 8k-32k, jax 0.11.2) and cuDNN dense attention
# at >= 200k tok/s (its 64k attention, about 1.4 GFLOP per token per step,
# at about 400 TFLOP/s): <= 130 s of train steps per model, plus about 30 s
# of compilation and 5 evals of 4 batches and 2 checkpoints: NSA and full
# together in about 5-6 minutes, within 8. More steps: ``--steps``.
GPU_TOKENS_PER_STEP = 65_536
GPU_STEPS = 400


def _gpu(seq_len: int, **overrides: Any) -> dict[str, Any]:
  """Short GPU runs (minutes on one H100) at long context, paper NSA."""
  return {
      "d_model": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 2,
      "head_dim": 64, "mlp_hidden": 1536, "dtype": "bfloat16",
      "steps": GPU_STEPS, "batch_size": GPU_TOKENS_PER_STEP // seq_len,
      "seq_len": seq_len, "lr": 1.5e-3, "warmup_steps": 40, "log_every": 10,
      "eval_every": 100, "eval_batches": 4, "ckpt_every": 200,
      "passkey_rows": 1, **overrides,
  }


# The full-attention model ``experiments/seer_adapt.py`` adapts on a CPU:
# cpu-demo's shape and T, 300 steps, one passkey row in every batch of 4.
_SEER_CPU = {**_CPU_DEMO, "passkey_rows": 1, "steps": 300,
             "warmup_steps": 30, "eval_every": 100, "ckpt_every": 150}

PRESETS: dict[str, dict[str, Any]] = {
    "cpu-demo": _CPU_DEMO,
    "seer-cpu": _SEER_CPU,
    "gpu-8k": _gpu(8192),
    "gpu-16k": _gpu(16384),
    "gpu-32k": _gpu(32768),
    # Batch 1: no room for a passkey row (it must be < batch); remat per
    # block keeps the step's memory near one block's activations at 64k.
    "gpu-64k": _gpu(65536, passkey_rows=0, remat="block"),
}
DEFAULT_PRESET = "cpu-demo"
