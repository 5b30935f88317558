# Two entry points on a fresh machine: `make demo` (the whole pipeline on built-in synthetic data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export RECSYS_QUIET ?= 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-test.txt
	touch $@

demo: venv
	$(PY) prepare_data.py synthetic --out data/synthetic

test: venv
	RECSYS_QUIET=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) data/synthetic runs
