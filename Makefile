# Every target (re)creates .venv in the repo root as needed.
# torch is pinned: on a CPU-only machine torch==2.13.0 is a local CPU wheel, while an unpinned
# torch resolves to a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-slow test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[torch,dev]'
	# transformers' SmolVLM2 video reference in tests/transformers_video.py: torchvision, off the path
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/torchvision torchvision==0.28.0
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The main job: train the tiny default on the built-in data (or reuse it), export it to ONNX, and answer
# test questions with PyTorch and the torch-free runtime.
demo: $(STAMP)
	$(BIN)/nanovlm demo

# The default tier: well under 15 minutes on 2 cores.
test: $(STAMP)
	$(BIN)/python -m ruff check . && $(BIN)/python -m ruff format --check .
	$(BIN)/python -m pytest -m "not slow and not arm64" -q

# Real SmolLM2-135M weights and longer training runs.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

test-all: test test-slow

lint: $(STAMP)
	$(BIN)/python -m ruff check . && $(BIN)/python -m ruff format --check .

clean:
	rm -rf $(VENV) .cache artifacts .pytest_cache
