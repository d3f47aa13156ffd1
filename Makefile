# Two entry points a fresh machine needs: `make serve` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ZOO    := .zoo

.PHONY: install serve test lint zoo clean browser

# torch is pinned to the local CPU build first: an unpinned torch would pull gigabytes of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(ZOO)/zoo.json: $(VENV)/.installed
	$(VENV)/bin/consilium zoo build $(ZOO)

zoo: $(ZOO)/zoo.json

# Foreground server on http://127.0.0.1:8000 (Ctrl-C stops it).
serve: zoo
	$(VENV)/bin/consilium serve configs/tiny.yaml

# The playground test drives Debian's chromium through chromium-driver: installed here when missing and
# we are root (CI); otherwise that one test skips and says why.
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

test: install browser
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(ZOO)
