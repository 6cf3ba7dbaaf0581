"""Loader test fixtures: small real shard folders built in tmp_path (see tests/helpers.py)."""
import pytest
from helpers import build_dataset


@pytest.fixture
def uneven(tmp_path, data_dir):
    """Three deliberately uneven shards: 10 records of 3..64 sequences, 487 sequences in all."""
    return build_dataset(tmp_path / "uneven", [[64, 64, 40, 3], [17], [64, 64, 64, 64, 43]])
