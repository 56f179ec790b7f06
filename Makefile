# The two set-up commands of the README. Both create .venv and install the package with its pinned SGLang.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 30000

.PHONY: install serve test

install: $(VENV)/.installed

# uv installs the same resolution as pip would (--index-strategy unsafe-best-match is pip's rule: the best
# version across all indexes), in parallel. --compile-bytecode writes the .pyc files pip writes: without them,
# and with PYTHONDONTWRITEBYTECODE set, every server start would compile SGLang anew.
UV_VERSION := 0.13.9

# uv reads none of pip's configuration. This prints pip's indexes, find-links and constraints as uv's
# variables, with pip's precedence: environment over [install] over [global].
define PIP_OPTIONS_AS_UV_ENV
import shlex, subprocess, sys
uv_name = {"index-url": "UV_DEFAULT_INDEX", "extra-index-url": "UV_EXTRA_INDEX_URL",
           "find-links": "UV_FIND_LINKS", "constraint": "UV_CONSTRAINT"}
rank = {"global": 1, "install": 2, ":env:": 3}
chosen = {}
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
for line in listing.stdout.splitlines():
    key, _, value = line.partition("=")
    section, _, option = key.rpartition(".")
    if option in uv_name and section in rank and rank[section] >= chosen.get(option, (0, ""))[0]:
        chosen[option] = (rank[section], " ".join(value.strip("'").split()))
for option, (_, value) in chosen.items():
    print(f"export {uv_name[option]}={shlex.quote(value)}")
endef
export PIP_OPTIONS_AS_UV_ENV

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION) 2>&1 | { grep -v '^WARNING: Location' || true; }
	eval "$$($(PY) -c "$$PIP_OPTIONS_AS_UV_ENV")" && \
	  $(VENV)/bin/uv pip install -q --python $(PY) --index-strategy unsafe-best-match --compile-bytecode -e '.[test]'
	touch $@

serve: install
	$(PY) -m easyep_sglang.demo --port $(PORT)

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15
