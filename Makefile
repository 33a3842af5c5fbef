# Two entry points, each sets up .venv on a fresh machine first; both can be
# run again in the same checkout.
#   make demo   trains a small NSA and a full-attention LM on CPU, prints and
#               plots the results; run again, it reports the finished runs
#               (FRESH=1 retrains them from scratch)
#   make test   lints (make lint: ruff) and runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_FLAGS := $(if $(FRESH),--fresh,)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: demo test lint
demo: $(VENV)/.installed
	$(PY) experiments/train_lm.py --preset cpu-demo $(DEMO_FLAGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q -n 2 --durations=15
