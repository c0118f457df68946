# One task runner for developers and CI. Every target installs what it needs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: demo test lint venv clean bench bench-scale

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[quantize,dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

## demo: build, verify, render and publish the embedded demo release (tiny model, local data, local git remote)
demo: $(STAMP)
	$(BIN)/glmrel demo-assets
	$(BIN)/glmrel build-all --config configs/demo.yaml
	$(BIN)/glmrel publish --config configs/demo.yaml --changelog v1

## bench: the light benchmarks (check speed on a GLM-4.7-shaped branch, hashing throughput)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.check_speed
	$(BIN)/python -m benchmarks.check_speed --hash-bench

# glmrel's AWQ against stock llm-compressor, side by side, on the tiny model (CPU, ~80 s).
# At GLM-4.7 layer size on a GPU: see benchmarks/results/README.md.
bench-scale: $(STAMP)
	$(BIN)/python -m benchmarks.scale --preset tiny --samples 1,2 --seq 32 --work out/bench-scale

## test: run the test suite
test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check release tests
	$(BIN)/ruff format --check release tests

clean:
	rm -rf out .cache .pytest_cache
