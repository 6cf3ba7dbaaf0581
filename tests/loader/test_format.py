"""The shard format: round trips, fixed bytes, and refusals of anything outside the contract."""
from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import webdataset as wds

from maskstream.loader.format import (
    FORMAT_VERSION,
    Block,
    FormatError,
    ShardWriter,
    check_shard_name,
    decode_block,
    dump_index,
    encode_block,
    make_index,
    read_index,
    remove_partials,
    shard_sha256,
    write_index,
)

L, V = 16, 70000  # a vocabulary over 2**16 exercises uint32 ids
TOKENIZER = {"vocab_size": V, "pad_id": 0, "mask_id": 4, "special_ids": [0, 1, 2, 3, 4]}


def _block(seed, n=5, copies=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (n, L)).astype(np.uint32)
    lengths = rng.integers(1, L + 1, n).astype(np.int32)
    block = Block(tokens=tokens, lengths=lengths, word_starts=rng.random((n, L)) < 0.5,
                  uids=rng.integers(0, 2**64 - 1, n, dtype=np.uint64))
    if copies:
        block.static_selected = rng.random((n, copies, L)) < 0.2
        block.static_inputs = np.where(block.static_selected, rng.integers(0, V, (n, copies, L)),
                                       tokens[:, None, :]).astype(np.int64)
    return block


def _index(entries):
    return make_index(entries=entries, seq_len=L, packing="full", tokenizer=TOKENIZER, masking_config={})


def _members(sample):
    return {k: v for k, v in sample.items() if not k.startswith("__")}


@pytest.mark.parametrize("copies", [0, 3])
def test_blocks_round_trip_through_a_tar_read_by_webdataset(tmp_path, copies):
    blocks = [_block(i, copies=copies) for i in range(3)]
    writer = ShardWriter.create(str(tmp_path), 0, vocab_size=V)
    for b in blocks:
        writer.add(b)
    entry = writer.close()
    assert entry["sequences"] == 15 and [n for _, n in entry["records"]] == [5, 5, 5]
    assert entry["sha256"] == shard_sha256(str(tmp_path / entry["name"]))
    assert entry["bytes"] == (tmp_path / entry["name"]).stat().st_size
    samples = list(wds.WebDataset(str(tmp_path / entry["name"]), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000", "000001", "000002"]
    for sample, want in zip(samples, blocks, strict=False):
        got = decode_block(_members(sample), seq_len=L, vocab_size=V, static_copies=copies)
        for field in ("tokens", "lengths", "word_starts", "uids", "static_selected", "static_inputs"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None and b is None) or np.array_equal(a, b), field


def test_record_offsets_let_a_reader_seek(tmp_path):
    writer = ShardWriter.create(str(tmp_path), 0, vocab_size=V)
    for i in range(4):
        writer.add(_block(i))
    entry = writer.close()
    with open(tmp_path / entry["name"], "rb") as f:
        f.seek(entry["records"][2][0])
        assert tarfile.open(fileobj=f, mode="r|").next().name == "000002.tokens.npy"


def test_same_blocks_give_the_same_bytes_with_fixed_tar_metadata(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        writer = ShardWriter.create(str(tmp_path / d), 7, vocab_size=V)
        writer.add(_block(1))
        writer.close()
    a, b = (tmp_path / "a" / "shard-000007.tar").read_bytes(), (tmp_path / "b" / "shard-000007.tar").read_bytes()
    assert a == b
    with tarfile.open(tmp_path / "a" / "shard-000007.tar") as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.mode, m.uname, m.pax_headers) == (0, 0, 0, 0o644, "", {})


def test_word_starts_cost_an_eighth_of_a_byte_per_token():
    members = encode_block(_block(0, n=64), vocab_size=V)
    assert len(members["word_starts.npy"]) <= 64 * L // 8 + 128  # bits plus the .npy header


def test_pickled_and_unknown_members_are_refused_unread():
    members = encode_block(_block(0), vocab_size=V)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    for ext in ("pyd", "pkl", "pth"):
        with pytest.raises(FormatError, match="not part of format"):
            decode_block({**members, ext: pickle.dumps(Boom())}, seq_len=L, vocab_size=V)
    buf = io.BytesIO()
    np.save(buf, np.array([Boom()], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="not a plain .npy"):
        decode_block({**members, "tokens.npy": buf.getvalue()}, seq_len=L, vocab_size=V)


def test_wrong_dtype_shape_size_or_ids_are_refused():
    members = encode_block(_block(0), vocab_size=V)
    bad = io.BytesIO()
    np.save(bad, np.zeros((5, L), np.float32))
    with pytest.raises(FormatError, match="dtype"):
        decode_block({**members, "tokens.npy": bad.getvalue()}, seq_len=L, vocab_size=V)
    with pytest.raises(FormatError, match="shape"):
        decode_block(members, seq_len=L + 1, vocab_size=V)
    with pytest.raises(FormatError, match="over the limit"):
        decode_block(members, seq_len=L, vocab_size=V, max_member_bytes=100)
    top = _block(0)
    top.tokens[0, 0] = V - 1
    with pytest.raises(FormatError, match="vocab size"):
        decode_block(encode_block(top, vocab_size=V), seq_len=L, vocab_size=V - 1)


@pytest.mark.parametrize("name", ["pipe:curl x", "/etc/passwd", "../shard-000000.tar", "shard-{0..9}.tar",
                                  "shard-${X}.tar", "sub/shard-000000.tar", "shard-1.tar"])
def test_unsafe_shard_names_are_refused(name):
    with pytest.raises(FormatError, match="plain names"):
        check_shard_name(name)


def test_index_is_checked_and_written_last_atomically(tmp_path):
    writer = ShardWriter.create(str(tmp_path), 0, vocab_size=V)
    writer.add(_block(0))
    index = _index([writer.close()])
    write_index(str(tmp_path), index)
    assert read_index((tmp_path / "index.json").read_bytes()) == index
    assert (tmp_path / "index.json").read_bytes() == dump_index(index)
    with pytest.raises(FormatError, match="version"):
        read_index(json.dumps({**index, "format_version": 99}))
    with pytest.raises(FormatError, match="incomplete"):
        read_index(json.dumps({k: v for k, v in index.items() if k != "counts"}))
    with pytest.raises(FormatError, match="incomplete or corrupt"):
        read_index(dump_index(index)[:50])
    with pytest.raises(FormatError, match="plain names"):
        read_index(json.dumps({**index, "shards": [{**index["shards"][0], "name": "pipe:cat /etc/passwd"}]}))
    with pytest.raises(FormatError, match="sequences"):
        read_index(json.dumps({**index, "counts": {"sequences": 6}}))


def test_partial_shards_of_a_crashed_run_are_removed(tmp_path):
    writer = ShardWriter.create(str(tmp_path), 3, vocab_size=V)
    writer.add(_block(0))  # never closed: the process "died"
    assert remove_partials(str(tmp_path)) == ["shard-000003.tar.partial"]
    assert list(tmp_path.iterdir()) == []


def test_shards_end_with_the_tar_marker_and_no_padding(tmp_path):
    import subprocess
    writer = ShardWriter.create(str(tmp_path), 0, vocab_size=V)
    writer.add(_block(0))
    entry = writer.close()
    data = (tmp_path / entry["name"]).read_bytes()
    assert data.endswith(b"\0" * 1024) and len(data) % 512 == 0 and len(data) % 10240 != 0
    listing = subprocess.run(["tar", "-tf", str(tmp_path / entry["name"])], capture_output=True, text=True,
                             check=True)
    assert listing.stdout.split() == [f"000000.{m}" for m in ("tokens.npy", "lengths.npy", "word_starts.npy",
                                                              "uids.npy")]
    assert listing.stderr == ""


def test_records_of_full_rows_carry_no_lengths_member():
    full = _block(0)
    full.lengths[:] = L
    members = encode_block(full, vocab_size=V)
    assert "lengths.npy" not in members
    assert np.array_equal(decode_block(members, seq_len=L, vocab_size=V).lengths, np.full(5, L))


def test_make_index_builds_a_readable_index_with_counts_from_the_entries(tmp_path):
    writer = ShardWriter.create(str(tmp_path), 0, vocab_size=V)
    writer.add(_block(0))
    entry = writer.close()
    index = make_index(entries=[entry], seq_len=L, packing="full", tokenizer=TOKENIZER, masking_config={},
                       counts={"documents_read": 2})
    assert index["format_version"] == FORMAT_VERSION
    assert index["counts"] == {"sequences": entry["sequences"], "tokens": entry["tokens"], "documents_read": 2}
    assert read_index(dump_index(index)) == index
