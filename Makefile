# maskstream — `make demo`, `make test`, `make bench`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch pin (`torch==X.Y.Z`), read from pyproject.toml: the one place pins live.
TORCH_PIN := $(shell sed -n 's/^ *"\(torch==[^"]*\)",*$$/\1/p' pyproject.toml)

.PHONY: install bytecode demo lint test test-fast bench bench-env clean

install: $(STAMP)

# NOTE: torch is installed first and pinned (TORCH_PIN): on these machines the pin resolves to the local CPU
# wheel; an unpinned torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	test -n "$(TORCH_PIN)" || { echo "no torch== pin found in pyproject.toml" >&2; exit 2; }
	$(BIN)/pip install -q '$(TORCH_PIN)'
	$(BIN)/pip install -q -e '.[test,dataflow,remote,hf]'
	touch $(STAMP)

# NOTE: the project is installed editable, so pip compiles none of its own modules; compiled here, every
# fresh process (each `maskstream` command, each Beam worker) skips compiling them, 20-80 ms, also where
# PYTHONDONTWRITEBYTECODE is set (as on our machines). Stale files are recompiled.
bytecode: install
	$(BIN)/python -m compileall -q maskstream pipeline loader trainer bench

lint: install
	$(BIN)/ruff check .

demo: bytecode
	$(BIN)/maskstream demo

# Everything, the slow tests included (CI runs this: .ci/run).
test: bytecode
	$(BIN)/python -m pytest -q tests

# The tests not marked slow (@pytest.mark.slow: more than ~3 s each): under a minute, for the edit-test loop.
test-fast: bytecode
	$(BIN)/python -m pytest -q -m "not slow" tests

$(VENV)/.bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	touch $(VENV)/.bench

bench-env: $(VENV)/.bench

bench: bench-env bytecode
	$(BIN)/maskstream bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
