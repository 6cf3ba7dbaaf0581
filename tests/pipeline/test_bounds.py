"""Bounded memory on hostile input: over-long lines and paragraphs, a gzip bomb, a .gz cut short."""
from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from maskstream.pipeline import readers

ROOT = Path(__file__).resolve().parents[2]
IN_MEMORY = ("--direct_running_mode", "in_memory")
GOOD = b'{"text": "A good document with a few words in it."}\n'


def read_rejects(out):
    return [json.loads(line) for line in (out / "rejects" / "rejects.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_a_line_over_the_limit_is_skipped_to_its_end_whatever_the_chunking(chunk):
    data = b"ab\ncd\r\n" + b"x" * 50 + b"\n" + b"y" * 10 + b"\nlast" + b"z" * 60
    got = list(readers.iter_lines(io.BytesIO(data), chunk=chunk, max_bytes=10))
    assert got == [b"ab", b"cd", readers.TooLong(50), b"y" * 10, readers.TooLong(64)]


def test_gunzip_reads_concatenated_members_and_refuses_a_file_cut_before_its_trailer():
    body = b"line one\nline two\n" * 500
    packed = gzip.compress(body)

    def read_all(data):
        g, out = readers.Gunzip(io.BytesIO(data), chunk=64), b""
        while piece := g.read(1000):
            assert len(piece) <= 1000
            out += piece
        return out
    assert read_all(packed + packed) == body + body and read_all(b"") == b""
    for cut in (1, 5, 8, len(packed) // 2):               # inside the trailer (CRC-32, length) or the data
        with pytest.raises(EOFError, match="cut short"):
            read_all(packed[:-cut])
    bad_crc = bytearray(packed)
    bad_crc[-8] ^= 1
    with pytest.raises(zlib.error):
        read_all(bytes(bad_crc))


def test_too_long_lines_and_paragraphs_are_rejects_and_the_rest_is_written(tmp_path, bert_json, job):
    (tmp_path / "a.jsonl").write_bytes(GOOD + b'{"text": "' + b"word " * 2000 + b'"}\n' + GOOD)
    (tmp_path / "b.txt").write_bytes(b"A short paragraph here.\n\n" + b"long line of words\n" * 400 + b"\nEnd.\n")
    out = tmp_path / "out"
    index = job([tmp_path / "a.jsonl", tmp_path / "b.txt"], bert_json, out, *IN_MEMORY, "--num-shards", 1,
                "--text-mode", "paragraph", "--max-record-bytes", 4096)
    got = [(r["source"].split("/")[-1], r["position"], r["reason"]) for r in read_rejects(out)]
    assert got == [("a.jsonl", 1, "too_long"), ("b.txt", 2, "too_long")]
    assert "10,012 bytes, over --max-record-bytes 4,096" in read_rejects(out)[0]["detail"]
    c = index["counts"]
    assert (c["documents_read"], c["documents_written"], c["documents_rejected"]) == (6, 4, 2)


def test_a_gz_cut_short_is_one_unreadable_reject_after_its_whole_lines(tmp_path, bert_json, job):
    lines = b"".join(b'{"text": "document number %d of a file cut short."}\n' % i for i in range(3000))
    packed = gzip.compress(lines)
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[:-20])      # a download cut short: trailer and some data gone
    out = tmp_path / "out"
    index = job([tmp_path / "cut.jsonl.gz"], bert_json, out, *IN_MEMORY, "--num-shards", 1)
    rejects = read_rejects(out)
    assert [r["reason"] for r in rejects] == ["unreadable"]     # not a malformed_json for the partial last line
    assert "cut short" in rejects[0]["detail"] and "EOFError" in rejects[0]["detail"]
    c = index["counts"]
    assert c["documents_written"] == rejects[0]["position"] < 3000 and c["documents_rejected"] == 1


BOMB_MEMBER = gzip.compress(b"a" * (1 << 20), compresslevel=9)     # 1 MiB of one byte, no newline: ~1 KB
RSS_JOB = r"""
import json, resource, sys
from maskstream.pipeline import run
index = run.run(sys.argv[1:])
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "counts": index["counts"]}))
"""


@pytest.mark.slow
def test_a_gzip_expanding_to_gigabytes_on_one_line_stays_in_bounded_memory(tmp_path, bert_json):
    """2 GiB on one line from a ~2 MB file (concatenated gzip members): rejected as too_long, peak RSS measured."""
    bomb = tmp_path / "bomb.jsonl.gz"
    with open(bomb, "wb") as f:
        f.write(gzip.compress(GOOD))
        f.write(BOMB_MEMBER * 2048)                                  # 2 GiB decompressed, one line
        f.write(gzip.compress(b"\n" + GOOD))
    assert bomb.stat().st_size < 4 << 20
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", RSS_JOB, "--input", str(bomb), "--tokenizer", str(bert_json),
                          "--output", str(out), "--quiet", *IN_MEMORY, "--num-shards", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"peak RSS {got['peak_mb']:.0f} MB for a 2 GiB line")      # shown with -s
    assert got["peak_mb"] < 1500
    c = got["counts"]
    assert (c["documents_written"], c["rejects_by_reason"]) == (2, {"too_long": 1})
    assert read_rejects(out)[0]["detail"].startswith(f"{(2048 << 20):,} bytes")


def parquet_raws(path, **kw):
    from maskstream.pipeline.config import SourceConfig
    return list(readers.iter_raw_records(str(path), SourceConfig(inputs=(str(path),), **kw)))


def test_a_parquet_value_over_the_limit_is_a_too_long_reject_and_its_neighbours_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a good row", "x" * 5000, "another good row"]}), path)
    got = [(r.position, r.fmt) for r in parquet_raws(path, max_record_bytes=4096)]
    assert got == [(0, "parquet"), (1, readers.TOO_LONG), (2, "parquet")]


PARQUET_BOMB = """
import sys
import pyarrow as pa
from maskstream.pipeline import readers
from maskstream.pipeline.config import SourceConfig
source = SourceConfig(inputs=(sys.argv[1],), max_record_bytes=int(sys.argv[2]))
raws = list(readers.iter_raw_records(sys.argv[1], source))
print(sorted({r.fmt for r in raws}), len(raws), pa.default_memory_pool().max_memory())
"""


@pytest.mark.slow
def test_a_parquet_row_group_averaging_over_the_limit_is_rejected_before_pyarrow_decodes_it(tmp_path):
    """A 128 MiB value that compresses to a few hundred KiB: the row group's metadata gives its size, so it is
    a too_long reject without being decompressed (pyarrow's pool never holds it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "bomb.parquet"
    bomb = pa.table({"text": ["z" * (128 << 20)]})
    pq.write_table(bomb, path, compression="zstd")
    del bomb
    assert path.stat().st_size < 4 << 20
    assert read_parquet_in_a_process(path, 1 << 20, peak_below=16 << 20) == ([readers.TOO_LONG], 1)


def read_parquet_in_a_process(path, max_record_bytes, *, peak_below: int) -> tuple[list[str], int]:
    """(formats of the records read, count), after checking pyarrow's memory pool peaked under `peak_below`."""
    done = subprocess.run([sys.executable, "-c", PARQUET_BOMB, str(path), str(max_record_bytes)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    formats, count, peak = done.stdout.rsplit(" ", 2)
    assert int(peak) < peak_below, done.stdout
    return eval(formats), int(count)  # noqa: S307 -- our own subprocess's printed list


@pytest.mark.slow
def test_parquet_rows_are_decoded_a_bounded_number_of_bytes_at_a_time(tmp_path):
    """2,000 rows of 50 KB (100 MB) in one row group, in small pages: about 16 MiB of text is decoded at a time
    (pyarrow's pool peaks near 46 MiB), not 4,096 rows at once (100 MiB).

    NOTE: pyarrow decodes a page whole, and its own writer closes a page only every write_batch_size rows
    (1,024 by default), so on files written that way the page, not the batch, bounds what is decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "long-rows.parquet"
    pq.write_table(pa.table({"text": [f"{i} " + "word " * 10_000 for i in range(2000)]}), path,
                   compression="zstd", write_batch_size=16)
    assert read_parquet_in_a_process(path, 64 << 20, peak_below=64 << 20) == (["parquet"], 2000)
