"""experiments/seer_adapt.py's library side: presets, tables, plot, flags."""

import pytest

from nsa_jax.seer import adapt
from nsa_jax.seer import report
from nsa_jax.train import presets as train_presets


def _results(speed=True):
  dense = {"perplexity": 5.0, "passkey": 0.8}
  rows = []
  for budget, ppl, ms in ((64, 5.5, 1.0), (256, 5.1, 2.0)):
    row = {"fraction": budget / 1024, "budget": budget, "blocks": budget // 16,
           "perplexity": ppl, "quality": 5.0 / ppl, "passkey": 0.5,
           "recall": 0.75 if budget == 64 else None}
    if speed:
      row["decode_ms"] = ms
    rows.append(row)
  results = {"dense": dense, "budgets": rows}
  if speed:
    dense["decode_ms"] = 4.0
    results["attention"] = [{
        "heads": [32, 8, 128], "context": 1024, "batch": 8,
        "dense": {"xla": 2.0, "cudnn": "ValueError: needs a GPU"},
        "sparse": {"64": 0.25, "256": "RuntimeError: out of memory"}}]
  return results


@pytest.mark.parametrize("name", sorted(adapt.PRESETS))
def test_presets_name_a_model_preset_and_leave_room_for_the_gate(name):
  preset = adapt.PRESETS[name]
  values = {**train_presets.DATA_DEFAULTS,
            **train_presets.PRESETS[preset.train_preset]}
  assert values["passkey_rows"] >= 1  # the model sees retrieval
  for fraction in adapt.BUDGET_FRACTIONS:
    # Block 0 and the own block are forced: the gate picks the rest.
    assert fraction * values["seq_len"] // preset.seer.block_size > 2


def test_tables_and_plot(tmp_path):
  quality = report.quality_table(_results()).splitlines()
  assert len(quality) == 2 + 3  # header, rule, dense, two budgets
  assert "| 1/16 (64) | 4 | 5.5000 | 0.909 | 0.50 | 0.750 | 1.000 | 4.0x |" \
      == quality[3]
  assert "| - |" in quality[4]  # no sparse query: no recall
  attention = report.attention_table(_results()).splitlines()
  assert attention[2].endswith("| 0.250 | 2.000 (xla) | 8.0x |")
  assert attention[3].endswith("| RuntimeError: out of memory | 2.000 (xla) "
                               "| - |")
  assert report.plot_budgets(_results(), tmp_path / "a.png").stat().st_size
  short = report.summary_tables(_results(speed=False)).splitlines()
  assert len(short) == 5 and len(short[0].split("|")) == 8  # no speed
  assert report.plot_budgets(_results(False), tmp_path / "b.png").exists()


def test_bad_flags_exit(capsys):
  with pytest.raises(SystemExit):
    adapt.run(["--budget-fractions", "0.5,2"])
  with pytest.raises(SystemExit):
    adapt.run(["--distill-steps", "0"])
  assert "--distill-steps must be >= 1" in capsys.readouterr().err
