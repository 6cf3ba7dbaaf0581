"""The job's bytes are pinned: shards made before a refactoring (tests/golden/) must come out the same after it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "pre-move.json").read_text())


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_shards_equal_those_made_before_the_package_move(name, job, hashes, tmp_path, monkeypatch):
    expected = GOLDEN[name]
    monkeypatch.chdir(ROOT)      # the inputs are given as the golden run gave them: relative to the repository
    out = tmp_path / name
    index = job(["tests/golden/sotu-6.jsonl"], "data/tokenizers/bert-base-uncased.json", out, *expected["flags"])
    got = {k: v for k, v in hashes(out).items() if k != "index.json"}
    assert got == expected["files"]
    assert index["counts"] == expected["counts"]
    assert index["shards"] == expected["shards"]
