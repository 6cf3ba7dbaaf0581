"""Document starts (format v2): packing records where each document begins inside a sequence, compactly."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from maskstream.loader.stages import document_fields
from maskstream.pipeline import packing


class _Info:   # the TokenizerInfo fields packing reads
    prefix, suffix, pad_id, sep_id = (101,), (102,), 0, 102


def _docs(sizes):
    return [packing.TokDoc("f", i, np.arange(1000 * (i + 1), 1000 * (i + 1) + n, dtype=np.uint32),
                           np.ones(n, dtype=bool)) for i, n in enumerate(sizes)]


def _expected_ids(sizes, seq_len, lengths):
    """Per row: each position's document, 0 for the row's first, -1 on padding, derived from the stream: a
    document is its tokens and the separator after it; the prefix joins the first body token's document and
    the suffix the last one's."""
    stream = np.concatenate([np.full(n + (i < len(sizes) - 1), i) for i, n in enumerate(sizes)])
    body, rows, pos = seq_len - 2, [], 0
    for n in lengths:
        take = stream[pos:pos + n - 2]
        pos += n - 2
        row = np.concatenate([[take[0]], take, [take[-1]], np.full(seq_len - n, -1)])
        rows.append(np.where(row >= 0, row - take[0], -1))
    assert pos == len(stream) and body
    return np.array(rows)


@pytest.mark.parametrize("sizes", [[10, 25, 3], [5, 5, 5, 5], [6, 1, 1, 12], [1], [30]])
def test_full_packing_records_exactly_the_documents_fed_in(sizes):
    """[5, 5, ...]: each document begins at a row's first body token (its row's start, none recorded);
    [6, ...]: a separator opens the next row, so that row's first document is [CLS][SEP]."""
    batch, _ = packing.pack_group(_docs(sizes), packing="full", seq_len=8, info=_Info, key=b"k" * 16,
                                  dtype=np.uint16)
    assert not batch.doc_starts[:, :2].any()
    ids, positions = document_fields(batch.doc_starts, batch.lengths)
    assert ids.tolist() == _expected_ids(sizes, 8, batch.lengths).tolist()
    for row, pos, n in zip(ids, positions, batch.lengths, strict=True):   # positions restart at each document
        for d in range(row.max() + 1):
            assert pos[row == d].tolist() == list(range((row == d).sum()))
        assert n == 8 or pos[n:].min() > 0


def test_doc_packing_sequences_hold_exactly_one_document():
    batch, _ = packing.pack_group(_docs([10, 25, 3]), packing="doc", seq_len=8, info=_Info, key=b"k" * 16,
                                  dtype=np.uint16)
    assert not batch.doc_starts.any()
    ids, positions = document_fields(batch.doc_starts, batch.lengths)
    assert ((ids == 0) | (ids == -1)).all() and (positions == np.arange(8)).all()


def test_sotu_document_starts_cost_under_five_hundredths_of_a_byte_per_token(sotu_run):
    """Format v2's doc_starts members (tar header, .npy header, offsets, padding) against the real tokens."""
    out, index, _ = sotu_run
    starts_bytes = 0
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".doc_starts.npy"):
                    starts_bytes += 512 + -(-m.size // 512) * 512
                    starts = np.load(io.BytesIO(tar.extractfile(m).read()))
                    assert starts.dtype == np.uint32 and (np.diff(starts.astype(np.int64)) > 0).all()
    tokens = index["counts"]["tokens"]
    total = sum(s["bytes"] for s in index["shards"]) / tokens
    print(f"SOTU: {total:.4f} bytes/token, of which document starts {starts_bytes / tokens:.4f}")
    assert 0 < starts_bytes / tokens <= 0.05 and total <= 2.242 + 0.05
