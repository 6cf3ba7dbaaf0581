"""Shared fixtures: the real data bundled in data/, and GPU skipping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import DATA, SOTU, TOKENIZER

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def bert_tokenizer_file() -> Path:
    return TOKENIZER


@pytest.fixture(scope="session")
def sotu_file() -> Path:
    return SOTU


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
