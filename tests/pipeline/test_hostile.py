"""No document can stop the job: hostile lines become rejects with a reason and a position; all-rejected is exit 2."""
from __future__ import annotations

import json

import numpy as np

from maskstream import cli
from maskstream.pipeline import readers, transforms

IN_MEMORY = ("--direct_running_mode", "in_memory")
DEEP = b"[" * 100_000                      # json.loads raises RecursionError on it
HOSTILE_JSONL = (b'{"text": "The first good document, with several words."}\n'
                 + DEEP + b"\n"
                 + b'{"text": "caf\xe9 is not utf-8"}\n'
                 + b'{"text": "A second good document follows here."}\n')


def read_rejects(out):
    return [json.loads(line) for line in (out / "rejects" / "rejects.jsonl").read_text().splitlines()]


def test_deep_nesting_and_invalid_utf8_are_rejected_and_the_valid_documents_written(tmp_path, bert_json, job):
    (tmp_path / "in.jsonl").write_bytes(HOSTILE_JSONL)
    out = tmp_path / "out"
    index = job([tmp_path / "in.jsonl"], bert_json, out, "--num-shards", "2", *IN_MEMORY)
    got = [(r["source"].split("/")[-1], r["position"], r["reason"]) for r in read_rejects(out)]
    assert got == [("in.jsonl", 1, "unparseable"), ("in.jsonl", 2, "invalid_utf8")]
    assert read_rejects(out)[0]["detail"].startswith("RecursionError: ")
    c = index["counts"]
    assert (c["documents_read"], c["documents_written"], c["documents_rejected"]) == (4, 2, 2)
    assert c["rejects_by_reason"] == {"invalid_utf8": 1, "unparseable": 1} and c["sequences"] > 0


def test_an_exception_cleaning_one_record_rejects_only_that_record():
    class Source:
        text_field, max_doc_chars = "text", 100
    raws = [readers.Raw("f", 0, 0, "jsonl", DEEP), readers.Raw("f", 1, 0, "jsonl", b'{"text": "ok"}')]
    docs, rejects = readers.clean_group(raws, Source)
    assert [(d.position, d.text) for d in docs] == [(1, "ok")]
    assert [(r.position, r.reason) for r in rejects] == [(0, readers.UNPARSEABLE)]


class _Fussy:
    """An encoder that raises on any text containing 'boom'; else one token per character."""
    def encode(self, texts):
        if any("boom" in t for t in texts):
            raise ValueError("cannot encode boom")
        return [(np.arange(len(t), dtype=np.int32), np.ones(len(t), dtype=bool)) for t in texts]


def test_a_document_the_tokenizer_raises_on_is_a_tokenize_error_and_its_group_still_tokenized():
    docs = [readers.Doc("f", 0, 0, 0, "fine"), readers.Doc("f", 1, 0, 0, "go "), readers.Doc("f", 1, 1, 0, "boom"),
            readers.Doc("f", 2, 0, 0, "also fine")]
    groups = [docs, [readers.Doc("g", 0, 0, 0, "x")]]
    (tokdocs, rejects), (other, none) = transforms.tokenize_or_reject(_Fussy(), groups)
    assert [(t.position, len(t.ids)) for t in tokdocs] == [(0, 4), (2, 9)]
    got = [(r.position, r.reason, r.detail) for r in rejects]
    assert got == [(1, "tokenize_error", "ValueError: cannot encode boom")]
    assert [t.source for t in other] == ["g"] and none == []


def test_all_rejected_input_ends_in_one_line_and_exit_2_without_an_index(tmp_path, bert_json, capsys):
    (tmp_path / "in.jsonl").write_bytes(DEEP + b"\n" + b'{"title": "no text"}\n')
    out = tmp_path / "out"
    rc = cli.main(["preprocess", "--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(bert_json),
                   "--output", str(out), "--quiet", *IN_MEMORY])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0, err
    assert "all 2 rejected (missing_field 1, unparseable 1)" in err and str(out / "rejects" / "rejects.jsonl") in err
    assert not (out / "index.json").exists() and len(read_rejects(out)) == 2


def test_a_corrupt_gzip_is_one_unreadable_reject_and_the_other_files_are_written(tmp_path, bert_json, job):
    import gzip
    lines = b"".join(b'{"text": "document number %d of a damaged file."}\n' % i for i in range(2000))
    packed = bytearray(gzip.compress(lines))     # 50 zero bytes mid-stream: zlib.error while reading
    packed[len(packed) // 2:len(packed) // 2 + 50] = bytes(50)
    (tmp_path / "bad.jsonl.gz").write_bytes(packed)
    (tmp_path / "good.jsonl").write_bytes(HOSTILE_JSONL)
    out = tmp_path / "out"
    index = job([tmp_path / "bad.jsonl.gz", tmp_path / "good.jsonl"], bert_json, out, *IN_MEMORY)
    bad = [r for r in read_rejects(out) if r["source"].endswith("bad.jsonl.gz")]
    assert [r["reason"] for r in bad] == ["unreadable"] and "rest of the file was not read" in bad[0]["detail"]
    c = index["counts"]
    assert c["documents_read"] == c["documents_written"] + c["documents_rejected"] and c["documents_written"] == 2


def test_a_read_failing_part_way_keeps_the_records_before_it(monkeypatch):
    def reader(path, source):
        yield 10, 0, b'{"text": "one"}'
        yield 10, 1, b'{"text": "two"}'
        raise OSError("disk went away")

    class Source:
        text_mode, group_bytes, text_field, max_doc_chars = "line", 1 << 20, "text", 100
    monkeypatch.setitem(readers.READERS, "jsonl", reader)
    raws = list(readers.iter_raw_records("f.jsonl", Source))
    assert [(r.position, r.fmt) for r in raws] == [(0, "jsonl"), (1, "jsonl"), (2, readers.UNREADABLE)]
    docs, rejects = readers.clean_group(raws, Source)
    assert [d.text for d in docs] == ["one", "two"]
    assert [(r.position, r.reason, r.detail) for r in rejects] == [
        (2, readers.UNREADABLE, "the rest of the file was not read: OSError: disk went away")]
