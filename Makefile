# Two commands do all the set-up on a fresh machine:  make demo   and   make test
# Set-up is idempotent: the virtual environment is (re)installed only when setup.py or the
# constraints change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints/cpu.txt
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast smoke-mcore019 sglang-side-env lint clean rehearse-all

$(STAMP): setup.py $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev,launch]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/masa demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Developers: skip the multi-process (torchrun) tests locally. CI runs everything.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Smoke test against megatron-core 0.19.x in a second environment (what Python 3.12 clusters get).
smoke-mcore019: $(STAMP)
	bash tools/smoke_mcore019.sh

# SGLang's own classes at the pinned version, for tests/test_sglang_contract.py (~6 GB; CI builds
# it; without it that test skips and says so).
sglang-side-env:
	bash tools/sglang_side_env.sh

# Every single-node recipe rehearsed on CPU at its real topology (`masa rehearse`, tiny model,
# stand-in SGLang servers): one summary line per recipe, then the wall time; fails if any fails.
REHEARSE_STEPS ?= 3
rehearse-all: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) -m masa_megatron.rehearsal.all --steps $(REHEARSE_STEPS) $(REHEARSE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check masa_megatron tests recipes tools benchmarks

clean:
	rm -rf $(VENV) .venv-mcore019 .venv-sglang .pytest_cache
