# maskstream — `make demo`, `make test`, `make bench`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch pin (`torch==X.Y.Z`), read from pyproject.toml: the one place pins live.
TORCH_PIN := $(shell sed -n 's/^ *"\(torch==[^"]*\)",*$$/\1/p' pyproject.toml)

.PHONY: install bytecode demo lint test test-fast bench bench-env clean gpu-prep

install: $(STAMP)

# NOTE: torch is installed first and pinned (TORCH_PIN): on these machines the pin resolves to the local CPU
# wheel; an unpinned torch would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	test -n "$(TORCH_PIN)" || { echo "no torch== pin found in pyproject.toml" >&2; exit 2; }
	$(BIN)/pip install -q '$(TORCH_PIN)'
	$(BIN)/pip install -q -e '.[test,dataflow,remote,hf,dask]'
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

# The GPU proof, prepared on this machine: gpu-bundle/ (ignored, < 60 MB) holds a dataset made by the Beam job and
# the wheels the GPU machine lacks (its python3.12 has torch, numpy, tokenizers, pyarrow, transformers)
# with the project's own wheel. Carry gpu-bundle/ there and run `bash bench/gpu_check.sh`; here, `--dry` checks it.
GPU_BUNDLE := gpu-bundle
GPU_WHEELS := webdataset==1.0.2 braceexpand pytest pluggy iniconfig pygments pytest-timeout
# compiled wheels the GPU machine lacks: xxhash checks every record (format v2); built for its CPython 3.12 on x86_64
GPU_BINARY_WHEELS := xxhash==4.1.0
gpu-prep: install
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)/wheels
	$(BIN)/pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d $(GPU_BUNDLE)/wheels $(GPU_WHEELS)
	$(BIN)/pip download -q --no-deps --python-version 3.12 --only-binary=:all: --implementation cp --abi cp312 \
	    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(GPU_BUNDLE)/wheels $(GPU_BINARY_WHEELS)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w $(GPU_BUNDLE)/wheels .
	$(BIN)/maskstream preprocess --input data/sotu.jsonl.gz --tokenizer data/tokenizers/bert-base-uncased.json \
	    --output $(GPU_BUNDLE)/data --seq-len 512 --num-shards 8 --quiet
	du -sh $(GPU_BUNDLE)

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
