# petals — set-up and everyday tasks. `make demo` and `make test` install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test check fix demo completions bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# A plain torch requirement pulls GBs of CUDA wheels: take the local CPU wheel when no torch is present.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[all,dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

check: install
	$(PY) -m ruff check petals_cli commands tests benchmarks
	$(PY) -m ruff format --check petals_cli commands tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

fix: install
	$(PY) -m ruff check --fix petals_cli commands tests benchmarks
	$(PY) -m ruff format petals_cli commands tests benchmarks

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

completions: install
	for shell in bash zsh fish; do _PETALS_COMPLETE=source_$$shell $(VENV)/bin/petals > completions/petals.$$shell; done

bench: install
	$(PY) benchmarks/swarm_vs_local.py --preset midsize
	$(PY) benchmarks/swarm_vs_local.py --preset tiny

clean:
	rm -rf $(VENV) .demo .pytest_cache
