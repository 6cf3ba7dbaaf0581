#!/usr/bin/env bash
# The GPU proof, one command on a CUDA machine: `bash bench/gpu_check.sh` (after `make gpu-prep` here).
#
# Uses that machine's own python3 and torch; installs only the bundled wheels and the project's wheel
# (pip --no-deps --no-index, into gpu-bundle/site: nothing else on the machine changes), runs every test marked
# `gpu`, then bench/gpu_proof.py, which prints one table. `--dry` checks the same script on a CPU machine: the gpu
# tests are collected and skipped, the figures come from the tiny model on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_BUNDLE:-gpu-bundle}
PY=${PYTHON:-python3}
DRY=""
[ "${1:-}" = "--dry" ] && DRY="--dry"
[ -f "$BUNDLE/data/index.json" ] || { echo "no $BUNDLE/data/index.json: run \`make gpu-prep\` first" >&2; exit 2; }
SITE="$BUNDLE/site"
rm -rf "$SITE" "$BUNDLE/out"
mkdir -p "$BUNDLE/out"
# the compiled wheels are built for the GPU machine's python3.12; a python that has the package keeps its own
WHEELS=()
for whl in "$BUNDLE"/wheels/*.whl; do
    name=$(basename "$whl"); name=${name%%-*}
    case "$whl" in *-none-any.whl) ;; *) "$PY" -c "import $name" 2>/dev/null && continue ;; esac
    WHEELS+=("$whl")
done
"$PY" -m pip install -q --no-deps --no-index --target "$SITE" "${WHEELS[@]}"
export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
# -P everywhere: the checkout's maskstream/ folder must not shadow the installed package
"$PY" -P - "$SITE" <<'PY'
import sys
from pathlib import Path
import torch
import maskstream
from maskstream.trainer import train  # noqa: F401  (the trainer and, through it, the loader)
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")
if Path(sys.argv[1]).resolve() not in Path(maskstream.__file__).resolve().parents:
    sys.exit(f"this python imports another maskstream ({maskstream.__file__}); use one without it")
if "apache_beam" in sys.modules:
    sys.exit("the loader or the trainer imported apache_beam")
PY
# every file holding a test marked gpu; collected alone, so the Beam tests are never imported
FILES=$(grep -l "pytest.mark.gpu" tests/*/*.py tests/*.py 2>/dev/null | sort)
set +e
# shellcheck disable=SC2086
timeout 240 "$PY" -P -m pytest -q -p no:cacheprovider -m gpu -o addopts="" --junitxml="$BUNDLE/out/gpu-tests.xml" $FILES
set -e
exec timeout 200 "$PY" -P -m maskstream.bench.gpu_proof --data "$BUNDLE/data" --junit "$BUNDLE/out/gpu-tests.xml" $DRY
