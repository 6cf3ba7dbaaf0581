"""Beam retries: a shard write retried after a failed (half-written) or a completed first attempt gives the bytes
and index entry of a single clean attempt, with one file per shard.

Beam's local FnApiRunner does not retry failed bundles (a failure fails the job), while Dataflow retries a
failed work item up to 4 times in batch; so these tests run the WriteShards DoFn itself twice on the same
input, the way a retrying runner would, instead of relying on a runner to inject the retry.
"""
from __future__ import annotations

import pytest

from maskstream.loader import format as fmt
from maskstream.pipeline import packing, readers, store, transforms
from maskstream.pipeline import run as pipeline_run
from maskstream.pipeline.encoder import Encoder
from maskstream.pipeline.tokenizer import tokenizer_from_json


@pytest.fixture(scope="module")
def shard_inputs(sotu_subset, bert_json):
    """The config, tokenizer info and the (shard, [SeqBatch]) elements WriteShards gets for the SOTU subset."""
    args, _ = pipeline_run.parse(["--input", str(sotu_subset), "--tokenizer", str(bert_json), "--output", "unused",
                                  "--num-shards", "2", "--masking", "static", "--static-copies", "2"])
    config, info, text, inputs = pipeline_run.prepare(args)
    encoder = Encoder(tokenizer_from_json(text))
    by_shard = {}
    for group in readers.iter_raw_groups(inputs[0][0], config.source):
        docs, _ = readers.clean_group(group, config.source)
        (tokdocs, _), = packing.tokenize_groups(encoder, [docs])
        batch, _ = packing.pack_group(tokdocs, packing="full", seq_len=config.pack.seq_len, info=info,
                                      key=config.data_hash(), dtype=fmt.token_dtype(info.vocab_size))
        for shard, part in packing.split_by_shard(batch, 2):
            by_shard.setdefault(shard, []).append(part)
    return config, info, sorted(by_shard.items())


def write(config, info, output, element):
    """One attempt of the WriteShards DoFn on one element, as a worker runs it (output: where the job writes)."""
    import dataclasses
    config = dataclasses.replace(config, shard=dataclasses.replace(config.shard, output=output))
    return list(transforms._WriteShard(config, info).process(element))


def contents(root: str) -> dict[str, bytes]:
    return {rel: store.read(store.join(root, rel)) for rel in sorted(store.files(root))}


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_retried_shard_write_gives_the_bytes_of_one_clean_attempt(shard_inputs, tmp_path, monkeypatch, where):
    if where == "memory":
        pytest.importorskip("fsspec")
    config, info, elements = shard_inputs
    root = (lambda name: str(tmp_path / name)) if where == "local" else \
        (lambda name: f"memory://maskstream-retries/{tmp_path.name}/{name}")
    small = _small_blocks(config)
    clean = [write(small, info, root("clean"), e) for e in elements]
    assert len(clean) == 2 and all(len(e[0]["records"]) > 1 for e in clean)

    # first attempt dies after its first record: a half-written shard under its temporary name
    real_add, calls = fmt.ShardWriter.add, []

    def dying_add(self, block):
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("worker lost")
        real_add(self, block)
    monkeypatch.setattr(fmt.ShardWriter, "add", dying_add)
    with pytest.raises(ConnectionError):
        write(small, info, root("retried"), elements[0])
    assert any(rel.endswith(fmt.PARTIAL_SUFFIX) for rel in store.files(root("retried")))
    monkeypatch.undo()
    # the runner retries that bundle, and re-runs another whose completed output it lost
    retried = [write(small, info, root("retried"), e) for e in elements]
    write(small, info, root("retried"), elements[1])
    assert retried == clean
    assert contents(root("retried")) == contents(root("clean"))
    assert sorted(store.files(root("retried"))) == [fmt.shard_name(0), fmt.shard_name(1)]   # once each
    assert sum(e[0]["sequences"] for e in retried) == sum(len(b) for _, bs in elements for b in bs)


def _small_blocks(config):
    """The config with 1 KiB records, so a shard has several records and the first attempt can die in between."""
    import dataclasses
    return dataclasses.replace(config, shard=dataclasses.replace(config.shard, block_bytes=1024))
