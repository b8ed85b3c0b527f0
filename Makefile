# The README's two commands: `make demo` (main job on the bundled data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Exact versions tested on the project's CPU machines; `make CONSTRAINTS= demo` lets pip choose.
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup browser demo test lint clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]' $(PIP_C)
	touch $@

setup: $(BIN)/.installed

# Debian's Chromium, for the web page's browser test.
browser:
	scripts/install-chromium.sh

demo: setup
	$(BIN)/breastcad train

# Fast tests plus the bounded subset of slow real-data tests marked `ci`.
test: setup browser
	$(BIN)/python -m pytest -q -m "not slow or ci"

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
