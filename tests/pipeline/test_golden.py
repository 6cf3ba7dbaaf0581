"""The job's bytes are pinned (tests/golden/pre-move.json), and they do not depend on how or from where the input
is named: each configuration runs with its input spelled differently (relative, absolute, from another folder).

Regenerate after a change meant to change shard bytes (say so in the commit):
    .venv/bin/python tests/pipeline/test_golden.py
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_FILE = ROOT / "tests" / "golden" / "pre-move.json"
GOLDEN = json.loads(GOLDEN_FILE.read_text())
INPUT = "tests/golden/sotu-6.jsonl"
TOKENIZER = "data/tokenizers/bert-base-uncased.json"
CONFIGS = {"default": [],
           "static-word": ["--masking", "static", "--static-copies", "2", "--selection", "word", "--seq-len", "64",
                           "--num-shards", "2"],
           "doc-span": ["--packing", "doc", "--selection", "span", "--seq-len", "96", "--num-shards", "3",
                        "--mask-prob", "0.3"]}
# name -> (working folder, how the input is spelled there): one spelling per configuration
SPELLINGS = {"default": (ROOT, INPUT),
             "static-word": (None, str(ROOT / INPUT)),                   # absolute, from a temporary folder
             "doc-span": (ROOT / "tests", os.path.join("..", INPUT))}    # relative to another folder


def pinned(name: str, out: Path, run_job, file_hashes, cwd: Path, spelled: str) -> dict:
    """{"flags", "files", "counts", "shards"} of configuration `name` run from cwd with the input spelled so."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        index = run_job([spelled], ROOT / TOKENIZER, out, *CONFIGS[name])
    finally:
        os.chdir(here)
    files = {k: v for k, v in file_hashes(out).items() if k != "index.json"}
    return {"flags": CONFIGS[name], "files": files, "counts": index["counts"], "shards": index["shards"]}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_shards_equal_the_pinned_ones_however_the_input_is_spelled(name, job, hashes, tmp_path):
    cwd, spelled = SPELLINGS[name]
    got = pinned(name, tmp_path / name, job, hashes, cwd or tmp_path, spelled)
    expected = GOLDEN[name]
    assert got["flags"] == expected["flags"]
    assert got["files"] == expected["files"]
    assert got["counts"] == expected["counts"]
    assert got["shards"] == expected["shards"]


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).parent), str(ROOT / "tests")]
    from conftest import file_hashes, run_job
    with tempfile.TemporaryDirectory() as tmp:
        golden = {name: pinned(name, Path(tmp) / name, run_job, file_hashes, ROOT, INPUT) for name in CONFIGS}
    GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_FILE}")
