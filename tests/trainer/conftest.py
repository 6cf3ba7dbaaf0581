"""Trainer test fixtures: small real SOTU shard folders (BERT WordPiece), written directly with ShardWriter.

The sequences and index come from the shared test helpers (tests/helpers.py); here they are
split into a training set and a disjoint held-out set, and the tokenizer is copied beside index.json as the
Beam job does, so fill-mask works on a run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TOKENIZER, VOCAB, sotu_sequences, write_index

from maskstream.loader import format as fmt

TRAIN_SEQUENCES = 256
HELD_OUT_SEQUENCES = 64


def write_split(directory: Path, start: int, stop: int, *, per_record: int = 32, per_shard: int = 128) -> Path:
    """Sequences [start, stop) of the SOTU stream as a shard folder with index.json and tokenizer.json."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens, lengths, word_starts, uids = (a[start:stop] for a in sotu_sequences(stop))
    entries = []
    for s, lo in enumerate(range(0, stop - start, per_shard)):
        writer = fmt.ShardWriter.create(str(directory), s, vocab_size=VOCAB.size)
        for r in range(lo, min(lo + per_shard, stop - start), per_record):
            sl = slice(r, min(r + per_record, lo + per_shard, stop - start))
            writer.add(fmt.Block(tokens=tokens[sl].astype(np.uint16), lengths=lengths[sl],
                                 word_starts=word_starts[sl], uids=uids[sl]))
        entries.append(writer.close())
    write_index(directory, entries)
    shutil.copyfile(TOKENIZER, directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="session")
def sotu_split(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """(train, held-out): 256 and 64 disjoint 128-token SOTU sequences."""
    root = tmp_path_factory.mktemp("sotu")
    total = TRAIN_SEQUENCES + HELD_OUT_SEQUENCES
    return (write_split(root / "train", 0, TRAIN_SEQUENCES),
            write_split(root / "held_out", TRAIN_SEQUENCES, total))
