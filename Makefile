# The README's two commands: `make demo` (main job on the bundled data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Exact versions tested on the project's CPU machines; `make CONSTRAINTS= demo` lets pip choose.
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup browser postgres demo test lint clean bench-frameworks

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]' $(PIP_C)
	touch $@

setup: $(BIN)/.installed

# Debian's Chromium, for the web page's browser test.
browser:
	scripts/install-chromium.sh

# Debian's PostgreSQL, for the test of tuning workers sharing one study (starts its own server).
postgres:
	scripts/install-postgres.sh

demo: setup
	$(BIN)/breastcad train

# Fast tests plus the bounded subset of slow real-data tests marked `ci`, on 2 workers
# (one test file per worker, so module fixtures are built once).
test: setup browser postgres
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow or ci"

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

clean:
	rm -rf $(VENV) runs .pytest_cache

# The framework comparison (docs/frameworks.md): one virtual environment per Keras backend
# under benchmarks/frameworks/envs/, then 2 grouped folds x 10 epochs per contender on
# ../shared/data/busi when it exists, else on the bundled copy.
FW_DATA := $(if $(wildcard ../shared/data/busi),--data ../shared/data/busi,)
bench-frameworks: setup
	PYTHON=$(PYTHON) benchmarks/frameworks/setup_envs.sh
	$(BIN)/python benchmarks/frameworks/bench_frameworks.py $(FW_DATA) --folds 2 --epochs 10
