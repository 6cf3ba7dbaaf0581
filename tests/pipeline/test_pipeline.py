"""The whole Beam job on tiny real files: TestPipeline + assert_that, rejects, static masks, crash and rerun."""
from __future__ import annotations

import io
import json
import subprocess

import apache_beam as beam
import numpy as np
import pytest
import torch
import webdataset as wds
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from helpers import read_sequences

from maskstream.loader import format as fmt
from maskstream.loader.masking import MaskingConfig, mask_batch
from maskstream.pipeline import run as pipeline_run
from maskstream.pipeline import transforms

IN_MEMORY = ("--direct_running_mode", "in_memory")

BAD_JSONL = (b'{"text": "The first good document, with several words."}\n'
             b'{"text": \n'                      # malformed JSON
             b'[1, 2]\n'                          # not an object
             b'{"title": "no text field"}\n'      # missing field
             b'{"text": 42}\n'                    # non-string field
             b'{"text": "   "}\n'                 # whitespace only
             b'\n'                                # blank line
             b'{"text": "\\u200b"}\n'             # normalizes to no tokens
             b'{"text": "A second good document follows here."}\n')
BAD_TEXT = b"good text line\n\xff\xfe not utf-8\n\nlast good line"


@pytest.fixture
def bad_corpus(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(BAD_JSONL)
    (tmp_path / "in" / "b.txt").write_bytes(BAD_TEXT)
    return tmp_path / "in"


@pytest.mark.slow
def test_graph_on_test_pipeline_accounts_for_every_document(bad_corpus, bert_json, tmp_path):
    args, beam_args = pipeline_run.parse(["--input", str(bad_corpus / "*"), "--tokenizer", str(bert_json),
                                          "--output", str(tmp_path / "out"), "--num-shards", "2"])
    config, info, text, inputs = pipeline_run.prepare(args)
    options = PipelineOptions(["--direct_running_mode=in_memory"])
    with test_pipeline.TestPipeline(runner=pipeline_run.local_runner(options), options=options) as p:
        pc = transforms.build(p, config=config, info=info, tokenizer_json=text, inputs=inputs)
        positions = pc["docs"] | "Positions" >> beam.FlatMap(
            lambda kv: [(d.source.split("/")[-1], d.position) for d in kv[1]])
        assert_that(positions, equal_to([("a.jsonl", 0), ("a.jsonl", 7), ("a.jsonl", 8), ("b.txt", 0), ("b.txt", 3)]),
                    label="Docs")   # line 7 passes cleaning, Tokenize rejects it (no tokens)
        counts = pc["index"] | "Counts" >> beam.Map(lambda i: (i["counts"]["documents_read"],
                                                               i["counts"]["documents_written"],
                                                               i["counts"]["documents_rejected"]))
        assert_that(counts, equal_to([(13, 4, 9)]), label="Counts")


def test_every_bad_input_kind_lands_in_rejects_with_its_reason(bad_corpus, bert_json, tmp_path, job):
    out = tmp_path / "out"
    index = job([bad_corpus / "*.jsonl", bad_corpus / "b.txt"], bert_json, out, *IN_MEMORY)
    rejects = [json.loads(line) for line in (out / "rejects" / "rejects.jsonl").read_text().splitlines()]
    got = {(r["source"].split("/")[-1], r["position"], r["reason"]) for r in rejects}
    assert got == {("a.jsonl", 1, "malformed_json"), ("a.jsonl", 2, "not_an_object"),
                   ("a.jsonl", 3, "missing_field"), ("a.jsonl", 4, "non_string_field"), ("a.jsonl", 5, "empty"),
                   ("a.jsonl", 6, "empty"), ("a.jsonl", 7, "no_tokens"), ("b.txt", 1, "invalid_utf8"),
                   ("b.txt", 2, "empty")}
    assert [(r["source"], r["position"]) for r in rejects] == sorted((r["source"], r["position"]) for r in rejects)
    c = index["counts"]
    assert c["documents_read"] == c["documents_written"] + c["documents_rejected"] == 13
    assert c["rejects_by_reason"]["empty"] == 3 and sum(c["rejects_by_reason"].values()) == 9


def test_static_masks_stored_equal_the_loader_rule_for_the_same_epochs(sotu_subset, bert_json, tmp_path, job):
    out = tmp_path / "out"
    index = job([sotu_subset], bert_json, out, *IN_MEMORY, "--masking", "static", "--static-copies", 3,
                    "--whole-word", "--seed", 7, "--num-shards", 2, "--seq-len", 64)
    assert index["masking"]["mode"] == "static" and index["masking"]["config"]["selection"] == "word"
    rows = read_sequences(out, index)
    uids = np.array(sorted(rows), dtype=np.uint64)
    tokens = torch.from_numpy(np.stack([rows[u][0] for u in uids]).astype(np.int64))
    starts = torch.from_numpy(np.stack([rows[u][1] for u in uids]))
    lengths = torch.tensor([rows[u][2] for u in uids])
    from maskstream.pipeline.tokenizer import load_tokenizer
    vocab = load_tokenizer(str(bert_json))[1].vocab()
    for epoch in range(3):
        inputs, labels = mask_batch(tokens, starts, lengths, torch.from_numpy(uids.view(np.int64)), seed=7,
                                    epoch=epoch, config=MaskingConfig(selection="word"), vocab=vocab)
        stored_sel = np.stack([rows[u][3][epoch] for u in uids])
        stored_inp = np.stack([rows[u][4][epoch] for u in uids])
        assert (stored_sel == (labels != -100).numpy()).all()
        assert (stored_inp == inputs.numpy()).all()


def test_plain_webdataset_and_tar_read_the_shards(sotu_subset, bert_json, tmp_path, job):
    out = tmp_path / "out"
    index = job([sotu_subset], bert_json, out, *IN_MEMORY, "--num-shards", 3)
    urls = [str(out / s["name"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == sum(len(s["records"]) for s in index["shards"])
    assert {"tokens.npy", "word_starts.npy", "uids.npy"} <= set(samples[0])
    listing = subprocess.run(["tar", "-tvf", urls[0]], capture_output=True, text=True, check=True).stdout
    assert "000000.tokens.npy" in listing and " 0/0 " in listing
    # lengths.npy is stored only where some row is padded; absent, every row is full
    seq_len = index["seq_len"]
    assert sum(int(np.load(io.BytesIO(s["lengths.npy"])).sum()) if "lengths.npy" in s
               else len(np.load(io.BytesIO(s["tokens.npy"]))) * seq_len for s in samples) == \
        index["counts"]["tokens"]


@pytest.mark.slow
def test_crashed_run_then_rerun_gives_exactly_the_clean_run(sotu_subset, bert_json, tmp_path, job, hashes):
    out = tmp_path / "out"
    job([sotu_subset], bert_json, out, *IN_MEMORY, "--num-shards", 3)
    clean = hashes(out)
    # a crash mid-write: one shard half-written under its temporary name, one gone, a stale index
    (out / "shard-000001.tar").rename(out / ("shard-000001.tar" + fmt.PARTIAL_SUFFIX))
    (out / "shard-000002.tar").write_bytes(b"truncated")
    (out / "index.json").write_text("{")
    (out / ("index.json" + fmt.PARTIAL_SUFFIX)).write_text("{")
    job([sotu_subset], bert_json, out, *IN_MEMORY, "--num-shards", 3)
    assert hashes(out) == clean


def test_oversized_documents_are_split_and_all_their_tokens_kept(tmp_path, bert_json, job):
    (tmp_path / "big.txt").write_text("alpha beta gamma " * 2000 + "\nsmall one\n")
    out = tmp_path / "out"
    index = job([tmp_path / "big.txt"], bert_json, out, *IN_MEMORY, "--max-doc-chars", 5000,
                    "--packing", "doc", "--num-shards", 1)
    c = index["counts"]
    assert c["documents_read"] == c["documents_written"] == 2
    assert c["content_tokens"] == 6000 + 2


def test_multi_threading_mode_is_refused(tmp_path, bert_json, sotu_subset, job):
    with pytest.raises(ValueError, match="multi_threading"):
        job([sotu_subset], bert_json, tmp_path / "o", "--direct_running_mode", "multi_threading")


def test_cli_trains_a_bpe_tokenizer_then_preprocesses_parquet_with_it(sotu_subset, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import maskstream.cli
    texts = [json.loads(line)["text"] for line in sotu_subset.read_text().splitlines()]
    pq.write_table(pa.table({"body": texts}), tmp_path / "sotu.parquet")
    tok = tmp_path / "bpe.json"
    assert maskstream.cli.main(["tokenizer", "train", "--input", str(tmp_path / "sotu.parquet"), "--text-field",
                                "body", "--vocab-size", "800", "--kind", "bpe", "--out", str(tok)]) == 0
    out = tmp_path / "out"
    assert maskstream.cli.main(["preprocess", "--input", str(tmp_path / "sotu.parquet"), "--text-column", "body",
                                "--tokenizer", str(tok), "--output", str(out), "--seq-len", "64", "--packing",
                                "doc", "--direct_running_mode=in_memory", "--quiet"]) == 0
    index = fmt.read_index((out / "index.json").read_bytes())
    assert index["tokenizer"]["kind"] == "bpe" and index["tokenizer"]["vocab_size"] == 800
    assert index["counts"]["documents_written"] == len(texts) and index["packing"] == "doc"
    rows = read_sequences(out, index)
    assert all(t[0] == index["tokenizer"]["cls_id"] and t[n - 1] == index["tokenizer"]["sep_id"]
               for t, _, n, _, _ in rows.values())
