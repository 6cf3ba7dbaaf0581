"""Loader test fixtures: small real shard folders built in tmp_path (see datasets.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datasets import DATA, build_dataset  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _shared_data():
    if not (DATA / "sotu.jsonl.gz").exists():
        pytest.skip(f"shared data not found at {DATA}")


@pytest.fixture
def uneven(tmp_path):
    """Three deliberately uneven shards: 5 records of 3..64 sequences, 487 sequences in all."""
    return build_dataset(tmp_path / "uneven", [[64, 64, 40, 3], [17], [64, 64, 64, 64, 43]])
