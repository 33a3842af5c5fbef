# Two entry points, each sets up .venv on a fresh machine first.
#   make demo   trains a small NSA and a full-attention LM on CPU, prints and plots the results
#   make test   runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(PY) experiments/train_lm.py --preset cpu-demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15
