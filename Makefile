# maskstream — `make demo`, `make test`, `make bench`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-env clean

install: $(STAMP)

# NOTE: torch is installed first and pinned: 2.13.0 resolves to the local CPU wheel; an unpinned
# torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,dataflow,remote]'
	touch $(STAMP)

demo: install
	$(BIN)/maskstream demo

test: install
	$(BIN)/python -m pytest -q tests

$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	touch $(VENV)/.bench

bench-env: $(VENV)/.bench

bench: bench-env
	$(BIN)/maskstream bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
