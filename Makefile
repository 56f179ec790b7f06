# The two set-up commands of the README. Both create .venv and install the package with its pinned SGLang.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 30000

.PHONY: install serve test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	touch $@

serve: install
	$(PY) -m easyep_sglang.demo --port $(PORT)

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15
