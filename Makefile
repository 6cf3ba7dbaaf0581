# maskstream — `make demo`, `make test`, `make bench`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install bytecode demo test bench bench-env clean

install: $(STAMP)

# NOTE: torch is installed first and pinned: 2.13.0 resolves to the local CPU wheel; an unpinned
# torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,dataflow,remote]'
	touch $(STAMP)

# NOTE: the project is installed editable, so pip compiles none of its own modules; compiled here, every
# fresh process (each `maskstream` command, each Beam worker) skips compiling them, 20-80 ms, also where
# PYTHONDONTWRITEBYTECODE is set (as on our machines). Stale files are recompiled.
bytecode: install
	$(BIN)/python -m compileall -q maskstream pipeline loader trainer bench

demo: bytecode
	$(BIN)/maskstream demo

test: bytecode
	$(BIN)/python -m pytest -q tests

$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	touch $(VENV)/.bench

bench-env: $(VENV)/.bench

bench: bench-env bytecode
	$(BIN)/maskstream bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
