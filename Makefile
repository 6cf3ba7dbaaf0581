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

# `make bench-peers`: MLMLoader against mosaicml-streaming and litdata on the same sequences (bench/bench_peers.py).
# NOTE: the peers get their own venv, .venv-peers, from bench/requirements-peers.txt: their pins conflict with ours
# (mosaicml-streaming 0.13: numpy < 2.2, transformers < 5). Torch first and pinned, as in .venv; the check after
# the install fails the build if anything pulled CUDA packages.
PEERS := .venv-peers
.PHONY: bench-peers
$(PEERS)/.installed: bench/requirements-peers.txt pyproject.toml
	test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q --upgrade pip
	test -n "$(TORCH_PIN)" || { echo "no torch== pin found in pyproject.toml" >&2; exit 2; }
	$(PEERS)/bin/pip install -q '$(TORCH_PIN)'
	$(PEERS)/bin/pip install -q -r bench/requirements-peers.txt '$(TORCH_PIN)'
	if $(PEERS)/bin/pip list 2>/dev/null | grep -i '^nvidia-'; then echo "CUDA packages in $(PEERS)" >&2; exit 2; fi
	touch $@

bench-peers: bytecode $(PEERS)/.installed
	$(BIN)/python -m maskstream.bench.bench_peers --peers-python $(PEERS)/bin/python
