"""End to end: the Beam job's shards, read back by the streaming loader, give the masks the rule promises."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import read_sequences, write_sotu_subset

from maskstream.loader import format as fmt
from maskstream.loader.masking import mask_batch
from maskstream.loader.stream import LoaderConfig, MLMLoader
from maskstream.pipeline import run as pipeline_run

K = 3
SEED = 17


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_sotu_subset(tmp_path_factory.mktemp("corpus") / "sotu-8.jsonl", 8)


@pytest.fixture(scope="module")
def static_dataset(corpus, bert_tokenizer_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "shards"
    pipeline_run.run(["--input", str(corpus), "--tokenizer", str(bert_tokenizer_file), "--output", str(out),
                      "--masking", "static", "--static-copies", str(K), "--seed", str(SEED),
                      "--selection", "word", "--num-shards", "3", "--quiet"])
    return out


def _raw_sequences(root):
    """(index, uid -> (tokens, word_starts, length, ...)), straight from the tar records."""
    index = fmt.read_index((root / fmt.INDEX_FILE).read_bytes())
    return index, read_sequences(root, index)


def test_static_shards_through_the_loader_equal_the_dynamic_rule_for_epoch_mod_k(static_dataset):
    index, raw = _raw_sequences(static_dataset)
    loader = MLMLoader(str(static_dataset), LoaderConfig(batch_size=8, seed=SEED))
    assert loader.static_copies == K and loader.masking.selection == "word"
    for epoch in range(K + 1):  # epoch K wraps around to copy 0
        loader.set_epoch(epoch)
        seen = 0
        for batch in loader:
            uids = batch["uids"].tolist()
            tokens = torch.from_numpy(np.stack([raw[u & (2**64 - 1)][0] for u in uids]))
            starts = torch.from_numpy(np.stack([raw[u & (2**64 - 1)][1] for u in uids]))
            lengths = torch.tensor([raw[u & (2**64 - 1)][2] for u in uids])
            want = mask_batch(tokens, starts, lengths, batch["uids"], seed=SEED, epoch=epoch % K,
                              config=loader.masking, vocab=loader.vocab)
            assert torch.equal(batch["input_ids"], want[0]) and torch.equal(batch["labels"], want[1])
            seen += len(uids)
        assert seen == loader.batches_per_epoch * 8
    assert index["masking"]["static_copies"] == K


def test_every_sequence_of_the_job_is_served_once_per_epoch(static_dataset):
    index, raw = _raw_sequences(static_dataset)
    loader = MLMLoader(str(static_dataset), LoaderConfig(batch_size=1, seed=SEED))
    uids = [u & (2**64 - 1) for batch in loader for u in batch["uids"].tolist()]
    assert sorted(uids) == sorted(raw) and len(uids) == index["counts"]["sequences"]


def test_dynamic_masks_change_every_epoch_without_rewriting_data(static_dataset, tmp_path):
    # the same shards read as dynamic data: any epoch, fresh masks; the bytes on disk never change
    before = {p.name: p.read_bytes() for p in static_dataset.iterdir() if p.is_file()}
    index, raw = _raw_sequences(static_dataset)
    uids = sorted(raw)[:16]
    tokens = torch.from_numpy(np.stack([raw[u][0] for u in uids]))
    starts = torch.from_numpy(np.stack([raw[u][1] for u in uids]))
    lengths = torch.tensor([raw[u][2] for u in uids])
    as_int64 = torch.from_numpy(np.array(uids, dtype=np.uint64).view(np.int64))
    loader = MLMLoader(str(static_dataset), LoaderConfig(batch_size=8, seed=SEED))
    masks = [mask_batch(tokens, starts, lengths, as_int64, seed=SEED, epoch=e, config=loader.masking,
                        vocab=loader.vocab)[1] for e in range(5)]
    assert all(not torch.equal(masks[i], masks[j]) for i in range(5) for j in range(i))
    assert before == {p.name: p.read_bytes() for p in static_dataset.iterdir() if p.is_file()}
