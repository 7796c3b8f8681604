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

# The reference configuration: a mid-size Llama (12 layers, hidden 1024) on 3 local servers vs local
# transformers, 64-token prompt, 128 new tokens; then a tiny model on 2 servers for per-step overhead.
bench: install
	$(PY) -m petals_cli.testing make-model .models/bench-midsize --family llama --layers 12 --hidden 1024 \
		--heads 16 --kv-heads 16 --intermediate 2816 --vocab 32000 --reuse >/dev/null
	$(PY) -m petals_cli.testing make-model .models/bench-tiny --family llama --layers 4 --reuse >/dev/null
	$(VENV)/bin/petals bench .models/bench-midsize --local-swarm 3 --compare-local --seq-len 64 --new-tokens 128
	$(VENV)/bin/petals bench .models/bench-tiny --local-swarm 2 --compare-local --mode inference

clean:
	rm -rf $(VENV) .demo .pytest_cache
