"""Record logic of the pipeline stages, tested without Beam: reading, cleaning, tokenizing, packing, uids."""
from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from maskstream.pipeline import packing, readers
from maskstream.pipeline.config import PackConfig, ShardConfig, SourceConfig
from maskstream.pipeline.encoder import word_starts_from_ids
from maskstream.pipeline.tokenizer import SPECIALS, convert_gpt2, describe, load_tokenizer, train


def raws(path, **kw):
    return list(readers.iter_raw_records(str(path), SourceConfig(inputs=(str(path),), **kw)))


def test_text_lines_keep_exact_positions_and_final_line_without_newline(tmp_path):
    p = tmp_path / "a.txt.gz"
    p.write_bytes(gzip.compress(b"one\r\n\ntwo\nthree"))
    assert [(r.position, r.data) for r in raws(p)] == [(0, b"one"), (1, b""), (2, b"two"), (3, b"three")]


def test_paragraph_mode_gives_blank_line_separated_blocks_at_their_first_line(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"a b\nc\n\n\nd\n")
    assert [(r.position, r.data) for r in raws(p, text_mode="paragraph")] == [(0, b"a b\nc"), (4, b"d")]


def test_iter_lines_handles_lines_across_chunk_boundaries():
    data = b"".join(b"line %d\n" % i for i in range(1000))
    assert list(readers.iter_lines(io.BytesIO(data), chunk=7)) == data.split(b"\n")[:-1]


def test_groups_are_consecutive_records_of_about_group_bytes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"".join(b"x" * 99 + b"\n" for _ in range(10)))
    assert [r.group for r in raws(p, group_bytes=250)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]


def test_parquet_rows_read_with_null_and_missing_column_failing_loudly(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": ["first doc", None, "third"]}), p)
    records = raws(p, text_field="body")
    assert [(r.position, r.data) for r in records] == [(0, "first doc"), (1, None), (2, "third")]
    cleaned = [readers.clean_record(r, SourceConfig(inputs=("x",), text_field="body")) for r in records]
    assert cleaned[1].reason == readers.MISSING_FIELD
    with pytest.raises(ValueError, match="no column 'text'"):
        raws(p)


@pytest.mark.parametrize("data, reason", [
    (b"\xff\xfe oops", readers.INVALID_UTF8),
    (b'{"text": ', readers.MALFORMED_JSON),
    (b"[1, 2]", readers.NOT_AN_OBJECT),
    (b'{"title": "x"}', readers.MISSING_FIELD),
    (b'{"text": 5}', readers.NON_STRING_FIELD),
    (b'{"text": " \\n\\t "}', readers.EMPTY),
    (b"   ", readers.EMPTY),
])
def test_every_bad_jsonl_record_is_rejected_with_its_reason(data, reason):
    out = readers.clean_record(readers.Raw("f.jsonl", 7, 0, "jsonl", data), SourceConfig(inputs=("x",)))
    assert isinstance(out, readers.Reject) and out.reason == reason and out.position == 7
    json.loads(out.to_json())   # the rejects file stays valid JSONL whatever the input bytes were


def test_oversized_documents_are_split_at_whitespace_into_parts():
    text = "word " * 1000
    out = readers.clean_record(readers.Raw("f.txt", 0, 0, "text", text.encode()),
                               SourceConfig(inputs=("x",), max_doc_chars=1000))
    assert len(out) == 5 and "".join(d.text for d in out) == text
    assert [d.part for d in out] == list(range(5)) and all(len(d.text) <= 1000 for d in out)
    assert all(d.text.endswith(" ") for d in out)


def test_unknown_file_extension_fails_with_the_allowed_endings():
    with pytest.raises(ValueError, match="allowed endings"):
        readers.detect_format("corpus.csv")


def test_bert_tokenizer_facts(bert_json):
    _, info, _ = load_tokenizer(str(bert_json))
    assert (info.pad_id, info.cls_id, info.sep_id, info.mask_id) == (0, 101, 102, 103)
    assert info.prefix == (101,) and info.suffix == (102,) and info.kind == "wordpiece"
    assert {0, 100, 101, 102, 103} <= set(info.special_ids) and info.vocab_size == 30522
    assert info.vocab().mask_id == 103


def test_word_starts_follow_word_ids_of_the_tokenizer(bert_json):
    tok, _, _ = load_tokenizer(str(bert_json))
    enc = tok.encode("Unbelievable tokenization, 中文", add_special_tokens=False)
    starts = word_starts_from_ids(enc.word_ids)
    pieces = [t for t, s in zip(enc.tokens, starts, strict=False) if not s]
    assert pieces and all(t.startswith("##") for t in pieces)   # continuation pieces only
    assert starts[enc.tokens.index("中")] and starts[enc.tokens.index("文")]   # CJK characters split


def test_trained_wordpiece_and_bpe_tokenizers_have_their_specials(sotu_texts, tmp_path):
    for kind in ("wordpiece", "bpe"):
        tok = train(iter(sotu_texts[:20]), kind=kind, vocab_size=600)
        tok.save(str(tmp_path / f"{kind}.json"))
        _, info, _ = load_tokenizer(str(tmp_path / f"{kind}.json"))
        names = SPECIALS[kind][0]
        assert [tok.token_to_id(n) for n in names] == list(range(5))
        assert info.kind == ("wordpiece" if kind == "wordpiece" else "bpe")
        assert info.cls_id == tok.token_to_id(names[0] if kind == "bpe" else "[CLS]")
        assert tok.decode(tok.encode("the people of the united states").ids).strip() == \
            "the people of the united states"


def test_gpt2_pair_converts_to_a_tokenizer_json_with_roberta_specials(data_dir):
    d = data_dir / "tokenizers"
    tok = convert_gpt2(str(d / "gpt2-vocab.json"), str(d / "gpt2-merges.txt"))
    info = describe(tok, tok.to_str())
    assert info.kind == "bpe" and info.vocab_size == 50257 + 5
    assert info.prefix == (tok.token_to_id("<s>"),) and info.suffix == (tok.token_to_id("</s>"),)
    assert info.mask_id == tok.token_to_id("<mask>")


class _Info:   # the TokenizerInfo fields packing reads
    prefix, suffix, pad_id, sep_id = (101,), (102,), 0, 102


def _tokdoc(pos, n, start=1000):
    ids = np.arange(start, start + n, dtype=np.uint32)
    return packing.TokDoc("f", pos, ids, np.ones(n, dtype=bool))


@pytest.mark.parametrize("mode", sorted(packing.PACKERS))
def test_packing_gives_exact_length_sequences_with_specials_and_counted_tails(mode):
    docs = [_tokdoc(0, 10), _tokdoc(1, 25, 2000), _tokdoc(2, 3, 3000)]
    batch, stats = packing.pack_group(docs, packing=mode, seq_len=8, info=_Info, key=b"k" * 16, dtype=np.uint16)
    assert batch.tokens.shape[1] == 8 and batch.tokens.dtype == np.uint16
    assert (batch.tokens[:, 0] == 101).all()
    for row, n in zip(batch.tokens, batch.lengths, strict=False):
        assert row[n - 1] == 102 and (row[n:] == 0).all()
    content = np.concatenate([row[1:n - 1] for row, n in zip(batch.tokens, batch.lengths, strict=False)])
    expected = [d.ids for d in docs]
    if mode == "full":   # documents joined by the separator, cut anywhere
        expected = [expected[0], [102], expected[1], [102], expected[2]]
        assert stats["tail_sequences"] == 1
    else:                # never crosses a document: one tail per document here
        assert stats["tail_sequences"] == 3
    assert content.tolist() == np.concatenate(expected).tolist()   # every token kept, in order
    assert stats["sequences"] == len(batch) and stats["tokens"] == int(batch.lengths.sum())
    assert stats["documents_written"] == 3


def test_uids_are_stable_distinct_and_keyed_by_the_config():
    a = packing.make_uids(b"k" * 16, "f.txt", 3, 100)
    assert a.dtype == np.uint64 and len(set(a.tolist())) == 100
    assert (a == packing.make_uids(b"k" * 16, "f.txt", 3, 100)).all()
    assert not set(a.tolist()) & set(packing.make_uids(b"j" * 16, "f.txt", 3, 100).tolist())
    assert not set(a.tolist()) & set(packing.make_uids(b"k" * 16, "f.txt", 4, 100).tolist())


def test_shard_placement_and_order_are_pure_functions_of_uids():
    uids = packing.make_uids(b"k" * 16, "f", 0, 5000)
    shards = packing.shard_of(uids, 7)
    assert set(shards.tolist()) == set(range(7)) and np.bincount(shards).min() > 600
    perm = np.random.default_rng(0).permutation(5000)
    assert (uids[packing.shard_order(uids)] == uids[perm][packing.shard_order(uids[perm])]).all()


@pytest.mark.parametrize("cls, kw, match", [
    (PackConfig, {"packing": "greedy"}, "full|doc"),
    (PackConfig, {"seq_len": 4}, "8..65536"),
    (ShardConfig, {"output": "o", "masking": "static"}, "--static-copies"),
    (ShardConfig, {"output": "o", "num_shards": 0}, "--num-shards"),
    (SourceConfig, {"inputs": ()}, "--input"),
])
def test_configs_refuse_bad_values_naming_the_fix(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**kw)



def test_uid_keys_are_the_path_below_the_inputs_folder_however_it_is_spelled(tmp_path, monkeypatch):
    from maskstream.errors import UserError
    from maskstream.pipeline.config import data_hash
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    for name in ("a.jsonl", "sub/b.jsonl"):
        (tmp_path / "corpus" / name).write_text('{"text": "x"}\n')
    assert readers.split_root("corpus/*/b.jsonl") == ("corpus", "*/b.jsonl")
    assert readers.split_root("gs://bucket/c/x.jsonl.gz") == ("gs://bucket/c", "x.jsonl.gz")
    assert readers.split_root("pg_*.jsonl") == ("", "pg_*.jsonl")
    monkeypatch.chdir(tmp_path)
    keys = {f.key for f in readers.expand_inputs(["corpus/*.jsonl", "corpus/*/*.jsonl"])}
    assert keys == {"a.jsonl", "sub/b.jsonl"}
    # (working folder, spelling): relative, absolute, roundabout, from another folder
    spellings = [(tmp_path, "corpus/a.jsonl"), (tmp_path, str(tmp_path / "corpus" / "a.jsonl")),
                 (tmp_path, "corpus/../corpus/./a.jsonl"), (tmp_path / "corpus" / "sub", "../a.jsonl")]
    config = {"source": {"inputs": [], "source_ids": []}, "tokenize": {"tokenizer": "t"}, "shard": {"output": "o"}}
    hashes = set()
    for cwd, spelled in spellings:
        monkeypatch.chdir(cwd)
        (found,) = readers.expand_inputs([spelled])
        assert (found.path, found.key) == (str(tmp_path / "corpus" / "a.jsonl"), "a.jsonl"), spelled
        # the data hash (which keys every uid) sees the same: the part below the root, or the --source-id
        hashes.add(data_hash({**config, "source": {"inputs": [readers.absolute(spelled)]}}))
    assert len(hashes) == 1
    assert data_hash({**config, "source": {"inputs": ["/x/a.jsonl"], "source_ids": ["web"]}}) not in hashes
    # two files that would share a key are refused; a --source-id per input tells them apart
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.jsonl").write_text('{"text": "y"}\n')
    both = [str(tmp_path / "corpus" / "a.jsonl"), str(tmp_path / "other" / "a.jsonl")]
    with pytest.raises(UserError, match="both be keyed 'a.jsonl'.*--source-id"):
        readers.expand_inputs(both)
    assert [f.key for f in readers.expand_inputs(both, ("c", "o"))] == ["c/a.jsonl", "o/a.jsonl"]
    with pytest.raises(UserError, match="one per --input"):
        readers.expand_inputs(both, ("c",))
