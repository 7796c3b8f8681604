# petals — set-up and everyday tasks. `make demo` and `make test` install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
# The drift checks build their own environments and run the suites that prove outputs exact.
DRIFT_SUITES := tests/unit/test_compat.py tests/unit/test_families.py tests/swarm/test_exactness.py \
	tests/swarm/test_families.py tests/swarm/test_batches.py
CPU_TORCH := 2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-latest test-oldest constraints check fix demo completions bench screenshots clean

install: $(STAMP)

# Installs exactly the versions of constraints.txt (what the suite last passed with), whatever day it is.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# A plain torch requirement pulls GBs of CUDA wheels: the constraints name the CPU wheel's version.
	$(PIP) install -q -c $(CONSTRAINTS) torch
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[all,dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

# A fresh environment in $(1), installed under the constraints that the command $(2) prints, with the extras
# $(3); then the suites that prove outputs exact.
define drift_check
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(2) > $(1)/constraints.txt
	$(1)/bin/python -m pip install -q -c $(1)/constraints.txt -e ".$(3)"
	$(1)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|hivemind|tokenizers|safetensors|huggingface.hub) "
	$(1)/bin/python -m pytest -q -p no:cacheprovider $(DRIFT_SUITES)
endef
ALL_EXTRAS := [all,dev]

# Drift: the newest releases pyproject.toml allows (torch stays at the CPU wheel), in a fresh .venv-latest.
# When it passes, `make constraints` pins what it installed.
test-latest:
	$(call drift_check,.venv-latest,echo torch==$(CPU_TORCH),$(ALL_EXTRAS))

# Drift the other way: every core dependency at the floor of its range (scripts/constraints.py lowest).
test-oldest:
	$(call drift_check,.venv-oldest,$(PYTHON) scripts/constraints.py lowest,[dev])

constraints:
	test -x .venv-latest/bin/python || { echo "run make test-latest first: constraints pin what it tested"; exit 2; }
	$(PYTHON) scripts/constraints.py freeze .venv-latest/bin/python > $(CONSTRAINTS)

check: install
	$(PY) -m ruff check petals_cli commands tests benchmarks
	$(PY) -m ruff format --check petals_cli commands tests benchmarks
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

fix: install
	$(PY) -m ruff check --fix petals_cli commands tests benchmarks
	$(PY) -m ruff format petals_cli commands tests benchmarks

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

# README's pictures of the web pages, taken by their browser tests (needs Debian's chromium).
screenshots: install
	PETALS_SCREENSHOTS=docs/screenshots $(PY) -m pytest -q -p no:cacheprovider tests/web

completions: install
	for shell in bash zsh fish; do _PETALS_COMPLETE=source_$$shell $(VENV)/bin/petals > completions/petals.$$shell; done

# The reference configuration: a mid-size Llama (12 layers, hidden 1024) on 3 local servers vs local
# transformers, 64-token prompt, 128 new tokens; then a tiny model on 2 servers for per-step overhead.
bench: install
	$(PY) -m petals_cli.testing make-model .models/bench-midsize --family llama --layers 12 --hidden 1024 \
		--heads 16 --kv-heads 16 --intermediate 2816 --vocab 32000 --reuse >/dev/null
	$(PY) -m petals_cli.testing make-model .models/bench-tiny --family llama --layers 4 --reuse >/dev/null
	$(VENV)/bin/petals bench .models/bench-midsize --local-swarm 3 --compare-local --seq-len 64 --new-tokens 128
	$(VENV)/bin/petals bench .models/bench-midsize --local-swarm 3 --mode inference --seq-len 64 --new-tokens 32 \
		--sessions 8
	$(VENV)/bin/petals bench .models/bench-tiny --local-swarm 2 --compare-local --mode inference

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .demo .pytest_cache
