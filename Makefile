# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/pip install -c constraints.txt

.PHONY: install demo test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# torch first and pinned (constraints.txt): an unpinned torch pulls GBs of CUDA wheels
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[dev]'
	touch $(STAMP)

models/base.safetensors: | $(STAMP)
	$(BIN)/opd pretrain --out models

# The main job: cluster up, every SPEC §5 run over HTTP, two tables, runs/demo/report.md, down.
demo: $(STAMP) models/base.safetensors
	$(BIN)/opd demo

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP) models/base.safetensors
	$(BIN)/python -m student.reference --steps 1500
	$(BIN)/python -m student.bench_backends --steps 300

lint: $(STAMP)
	$(BIN)/ruff check common services student tests
	$(BIN)/ruff format --check common services student tests

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
