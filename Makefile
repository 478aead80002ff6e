# stem-nb: two commands do everything on a fresh machine.
#   make reproduce   set up the environment (idempotent) and run the main job (the CPU reproduction)
#   make test        set up the environment (idempotent) and run the whole test suite
# Others: make smoke | bench (one JSON line per result) | gpu-check (scripts/gpu_check.sh; GPU_CHECK_ARGS=--dry-run on a CPU)
#         | docs (the documentation site in _docs/: open _docs/index.html)
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTHON ?= python3
PRESET ?= cpu
# CPU machines take the local CPU wheel (an unpinned torch would pull a multi-GB CUDA build);
# where nvidia-smi answers, pip picks the default (CUDA) build.
TORCH  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
OFFLINE := HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: env reproduce test smoke lab export bench gpu-check docs

env: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

reproduce: env
	$(OFFLINE) $(BIN)/stem-nb reproduce --preset $(PRESET)

smoke: env
	$(OFFLINE) $(BIN)/stem-nb smoke

# pytest exits 5 when it collects no test: that is a failure too (any non-zero code stops make); two pytest
# workers, each taking whole files (--dist loadfile), so a module's fixtures are built once; the 25 slowest steps are
# printed at the end (where the suite's time goes)
test: env
	$(OFFLINE) $(BIN)/nbdev-test --n-workers 2 --timing
	$(OFFLINE) $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25 tests

bench: env
	$(OFFLINE) $(BIN)/stem-nb bench

gpu-check: env
	scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# The site: every notebook run as `make test` runs it (cells flagged slow/gpu left out), nbdev's API docs, rendered
# by pandoc from the pypandoc-binary wheel (quarto-cli's PyPI package downloads its binary from GitHub when it is
# built). tests/test_docs.py opens the site in headless Chromium. See scripts/build_docs.py.
PANDOC_PKG := pypandoc-binary==1.17

docs: env $(VENV)/.docs-stamp
	$(OFFLINE) $(BIN)/python scripts/build_docs.py

$(VENV)/.docs-stamp: $(VENV)/.stamp Makefile
	$(BIN)/pip install -q --disable-pip-version-check "$(PANDOC_PKG)"
	touch $@

lab: env
	$(BIN)/jupyter lab

export: env
	$(BIN)/nbdev-clean && $(BIN)/nbdev-export
