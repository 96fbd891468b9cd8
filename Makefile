# Two commands for a new machine: `make demo` and `make test`. Both create or refresh .venv themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo learn test test-load test-fast test-inplace-seeds bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned, so no later requirement can pull a different (CUDA) build.
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev]"
	# transformers 5 in its own folder, for tests/trainer/models/test_hf_save.py (our saves load in 4.57 and 5.x).
	# --no-deps with the packages pip resolves against this venv for it, so torch and the shared packages stay the
	# venv's; installed beside and moved into place, so an interrupted install is redone rather than half used.
	test -d .cache/transformers5/transformers-5.25.0.dist-info || { rm -rf .cache/transformers5 .cache/transformers5.tmp && \
		$(BIN)/pip install -q --no-deps --target .cache/transformers5.tmp transformers==5.25.0 huggingface-hub==2.4.0 \
			tokenizers==0.23.3 kernels==0.19.1 httpx2==2.17.0 httpcore2==2.17.0 anyio==4.16.0 h11==0.16.0 \
			truststore==0.10.5 tomlkit==0.15.3 && \
		mv .cache/transformers5.tmp .cache/transformers5; }
	# A real Prometheus server for the dashboard and alert tests: Debian's package, when it is missing.
	command -v prometheus >/dev/null || ! command -v apt-get >/dev/null || \
		apt-get install -y -q --no-install-recommends prometheus >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null)
	# A real browser for the dashboard's tests (Playwright drives it): Debian's Chromium, when it is missing.
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
		apt-get install -y -q --no-install-recommends chromium >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/vlctl demo

# Does the tiny model learn? docs/learning.md: video direction from random init in 400 steps, ~8 min on 2 cores.
# Rerunning resumes the finished run (nothing to train) and scores it again.
learn: $(STAMP)
	$(BIN)/python -m trainer.data.synthetic runs/learn/data --seed 0 --num-images 1000 --num-videos 2000 \
		--num-texts 0 --image-size 56 --max-shapes 1 --video-size 56 --video-seconds 2.0 --video-fps 4 \
		--val-fraction 0.1 >/dev/null
	OMP_NUM_THREADS=2 $(BIN)/python -m trainer.train examples/learning.yaml
	$(BIN)/python -m trainer.evaluate runs/learn/run --data runs/learn/data/val/video_qa.jsonl \
		--answers runs/learn/answers.jsonl >runs/learn/report.json
	@echo "report: runs/learn/report.json, answers: runs/learn/answers.jsonl"

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The timing-dependent tests (marker `timing`) REPEAT times in a row next to one CPU hog per core: CI machines are loaded.
test-load: $(STAMP)
	$(BIN)/python tests/run_under_load.py --repeat $(or $(REPEAT),5)

bench: $(STAMP)
	$(BIN)/python -m bench

# Issue 13's acceptance 1: in-place recovery on both topologies, the kill at a step drawn from each of 5 seeds.
test-inplace-seeds: $(STAMP)
	VLCTL_INPLACE_SEEDS=$(or $(SEEDS),5) VLCTL_INPLACE_TOPOLOGIES=dp2-2x1,dp2xpp2-2x2 \
		$(BIN)/python -m pytest -q -s tests/trainer/recovery/test_inplace_run.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .cache .pytest_cache
