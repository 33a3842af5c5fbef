"""Named run presets of ``experiments/train_lm.py``: flag values by name.

A preset maps flag destinations (``LMConfig`` fields, ``NSAConfig`` fields
prefixed ``nsa_``, ``TrainConfig`` fields and the data settings of
``DATA_DEFAULTS``) to values; flags given on the command line win.
"""

from __future__ import annotations

from typing import Any

DATA_DEFAULTS: dict[str, Any] = {
    "data": "code", "passkey_rows": 0, "corpus_dir": "",
    "max_corpus_bytes": 0, "val_fraction": 0.05,
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


def _gpu(seq_len: int, batch_size: int) -> dict[str, Any]:
  """Short GPU runs (minutes on one H100/H200) at long context, paper NSA."""
  return {
      "d_model": 512, "num_layers": 6, "num_heads": 8, "num_kv_heads": 2,
      "head_dim": 64, "mlp_hidden": 1536, "dtype": "bfloat16",
      "steps": 600, "batch_size": batch_size, "seq_len": seq_len,
      "lr": 1.5e-3, "warmup_steps": 60, "log_every": 10, "eval_every": 100,
      "eval_batches": 4, "ckpt_every": 200, "passkey_rows": 1,
  }


PRESETS: dict[str, dict[str, Any]] = {
    "cpu-demo": _CPU_DEMO,
    "gpu-8k": _gpu(8192, 8),
    "gpu-16k": _gpu(16384, 4),
    "gpu-32k": _gpu(32768, 2),
}
DEFAULT_PRESET = "cpu-demo"
