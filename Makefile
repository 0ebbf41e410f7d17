# Two entry points for a fresh machine: `make quickstart` and `make test`.
# Both create .venv, install torch first (CPU wheel 2.13.0 by default), then the project.
# For a CUDA build: make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: venv test quickstart lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(PY) -m ruff check .

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n auto --dist loadgroup  # one worker per core; Ray tests share one

quickstart: venv
	$(PY) scripts/quickstart.py

clean:
	rm -rf $(VENV)
