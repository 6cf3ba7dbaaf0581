"""The job on the whole SOTU corpus (one shared multi-process run): accounting, round trip, determinism."""
from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds

from maskstream.loader import format as fmt
from maskstream.pipeline import packing
from maskstream.pipeline.config import data_hash
from maskstream.pipeline.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow     # one run of the whole corpus (sotu_run) is most of it


def test_sotu_index_accounts_for_every_document_and_token(sotu_run, sotu_texts):
    out, index, _ = sotu_run
    c = index["counts"]
    assert c["documents_read"] == len(sotu_texts) == c["documents_written"] + c["documents_rejected"]
    assert c["documents_rejected"] == 0 and (out / "rejects" / "rejects.jsonl").read_text() == ""
    assert c["sequences"] == sum(s["sequences"] for s in index["shards"]) and len(index["shards"]) == 4
    assert fmt.read_index((out / "index.json").read_bytes()) == index
    for shard in index["shards"]:
        assert fmt.shard_sha256(str(out / shard["name"])) == shard["sha256"]
    assert not [p for p in out.rglob("*") if p.name.endswith(fmt.PARTIAL_SUFFIX)]
    assert index["tokenizer"]["sha256"] == index["config"]["tokenize"]["tokenizer_sha256"]
    # the dataset carries the exact tokenizer it was made with
    import hashlib
    assert index["tokenizer"]["file"] == "tokenizer.json"
    assert hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest() == index["tokenizer"]["sha256"]


def test_sotu_detokenized_sequences_give_back_the_source_text(sotu_run, sotu_texts, bert_json):
    """Full packing: a pack group's sequences, found by their uids (config hash, group start, index), decode
    back to its documents, normalized as the tokenizer normalizes."""
    out, index, _ = sotu_run
    tok, info, _ = load_tokenizer(str(bert_json))
    content = {}
    for shard in index["shards"]:
        for sample in wds.WebDataset(str(out / shard["name"]), shardshuffle=False):
            block = fmt.decode_block({k: v for k, v in sample.items() if not k.startswith("__")},
                                     seq_len=index["seq_len"], vocab_size=info.vocab_size)
            for i, uid in enumerate(block.uids.tolist()):
                content[uid] = block.tokens[i, 1:block.lengths[i] - 1]   # without [CLS] .. [SEP]
    key, source = data_hash(index["config"]), index["inputs"][0]["key"]   # uids hash the file's key
    streams = []
    for start in range(len(sotu_texts)):        # a group's uids are keyed by its first document's position
        if int(packing.make_uids(key, source, start, 1)[0]) not in content:
            continue
        uids = packing.make_uids(key, source, start, 20_000).tolist()
        seqs = [content.pop(u) for u in uids[:next(k for k, u in enumerate(uids) if u not in content)]]
        if seqs:
            streams.append(np.concatenate(seqs))
    assert not content                          # every sequence found, once
    got = "".join("".join(tok.decode(s.tolist()) for s in streams).split())
    want = "".join(tok.normalizer.normalize_str("".join(sotu_texts)).split())
    assert got == want


def test_rerun_after_crash_in_the_other_mode_gives_byte_identical_shards_and_index(sotu_run, sotu_file, bert_json,
                                                                                   job, hashes):
    out, index, before = sotu_run
    (out / "shard-000000.tar").rename(out / ("shard-000000.tar" + fmt.PARTIAL_SUFFIX))  # killed mid-write
    (out / "index.json").write_text(json.dumps({"format_version": 1}))
    job([sotu_file], bert_json, out, "--local-mode", "in_memory", "--num-shards", 4)   # the run was multi-process
    assert hashes(out) == before


def test_one_worker_in_memory_gives_the_same_bytes_as_two_processes(sotu_run, sotu_file, bert_json, tmp_path,
                                                                    job, hashes):
    out, _, before = sotu_run
    job([sotu_file], bert_json, tmp_path, "--direct_running_mode", "in_memory", "--num-shards", 4)
    after = hashes(tmp_path)
    assert {k: v for k, v in after.items() if k.endswith(".tar")} == \
        {k: v for k, v in before.items() if k.endswith(".tar")}
    assert after["rejects/rejects.jsonl"] == before["rejects/rejects.jsonl"]
