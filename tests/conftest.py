"""Shared fixtures: where the real data lives, and GPU skipping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# CI clones the repo with shared/ beside it; a developer's checkout sits at /work/main beside /work/shared.
SHARED_DATA = Path(os.environ.get("MASKSTREAM_SHARED_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}; set MASKSTREAM_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bert_tokenizer_file(shared_data) -> Path:
    return shared_data / "tokenizers" / "bert-base-uncased.json"


@pytest.fixture(scope="session")
def sotu_file(shared_data) -> Path:
    return shared_data / "sotu.jsonl.gz"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
