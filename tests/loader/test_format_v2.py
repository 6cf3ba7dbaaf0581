"""Format v2: record checksums checked while streaming, index.json validated whole, .npy headers checked before
any allocation, document fields in batches, and v1 datasets still read."""
from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import collect, read_sequences, read_tar, rewrite_shard

from maskstream.loader import format as fmt
from maskstream.loader.inspector import main as inspect_main
from maskstream.loader.stages import document_fields, varlen_fields
from maskstream.loader.stream import LoaderConfig, MLMLoader

V1 = Path(__file__).resolve().parents[1] / "golden" / "v1-sotu-3"  # written by the v1 code, 3 SOTU addresses


def _index(root) -> dict:
    return json.loads((Path(root) / "index.json").read_text())


def test_a_flipped_byte_inside_a_tokens_payload_fails_naming_shard_and_record(uneven):
    entry = _index(uneven)["shards"][2]
    offset = entry["records"][1][0]
    path = uneven / "shard-000002.tar"
    data = bytearray(path.read_bytes())
    data[offset + 512 + 128 + 40] ^= 0x01  # inside record 1's tokens.npy payload: still a valid tar and .npy
    path.write_bytes(bytes(data))
    with pytest.raises(fmt.FormatError, match=rf"shard-000002.tar record 1 at offset {offset}: xxh3_64 "):
        collect(MLMLoader(uneven, LoaderConfig(batch_size=16)))


def test_a_same_size_valid_tar_rewrite_fails(uneven):
    """Record 0's tokens replaced by other valid ids (its rows reversed): a valid tar and .npy of the same size."""
    path = uneven / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    name, payload = read_tar(path)[0]
    assert name == "000000.tokens.npy"
    swapped = io.BytesIO()
    np.save(swapped, np.load(io.BytesIO(payload))[::-1].copy())
    assert len(swapped.getvalue()) == len(payload) and swapped.getvalue() != payload
    data[512:512 + len(payload)] = swapped.getvalue()
    path.write_bytes(bytes(data))
    assert len(read_tar(path)) == len(read_tar(path))  # still a readable tar
    with pytest.raises(fmt.FormatError, match="shard-000000.tar record 0 at offset 0: xxh3_64 .* index.json says"):
        collect(MLMLoader(uneven, LoaderConfig(batch_size=16)))
    collect(MLMLoader(uneven, LoaderConfig(batch_size=16, check_records=False)))  # v1's way: read silently


def _bad(index: dict, edit) -> bytes:
    index = json.loads(json.dumps(index))
    edit(index)
    return json.dumps(index).encode()


@pytest.mark.parametrize("edit, match", [
    (lambda ix: ix.update(format_version=True), r"format_version is True"),
    (lambda ix: ix.update(format_version=3), r"format_version is 3; this maskstream reads versions \[1, 2\]"),
    (lambda ix: ix["shards"][0].update(records="0,64"), r"shards\[0\].records is '0,64' \(str\), expected a list"),
    (lambda ix: ix["shards"][1].pop("sha256"), r"shards\[1\] lacks \['sha256'\]"),
    (lambda ix: ix.update(shards={"a": 1}), r"shards is .* \(dict\), expected a list"),
    (lambda ix: ix["shards"][0]["records"][1].__setitem__(0, 1.5), r"shards\[0\].records\[1\]\[0\] is 1.5"),
    (lambda ix: ix["shards"][0]["records"][1].__setitem__(1, True), r"shards\[0\].records\[1\]\[1\] is True"),
    (lambda ix: ix["shards"][0]["records"][2].__setitem__(0, 10), r"records\[2\]\[0\] is 10, expected .* in \["),
    (lambda ix: ix["shards"][0].update(bytes=-1), r"shards\[0\].bytes is -1"),
    (lambda ix: ix["shards"][0]["checksums"].pop(), r"checksums has 3 entries for 4 records"),
    (lambda ix: ix["shards"][0]["checksums"].__setitem__(0, 12), r"checksums\[0\] is 12"),
    (lambda ix: ix["tokenizer"].update(vocab_size="30522"), r"tokenizer.vocab_size is '30522' \(str\)"),
    (lambda ix: ix["tokenizer"].update(mask_id=10**6), r"tokenizer.mask_id is 1000000, expected an integer in"),
    (lambda ix: ix["masking"].update(mode="both"), r"masking.mode is 'both'"),
    (lambda ix: ix.update(seq_len=None), r"seq_len is None"),
    (lambda ix: ix["counts"].update(sequences="487"), r"counts.sequences is '487'"),
    (lambda ix: ix.update(checksum="md5"), r"checksum is 'md5'; format v2 records use 'xxh3_64'"),
    (lambda ix: ix.pop("checksum"), r"lacks \['checksum'\]"),
    (lambda ix: ix["shards"].append(ix["shards"][0]), r"listed twice"),
])
def test_every_problem_of_index_json_is_one_clear_format_error(uneven, edit, match):
    index = _index(uneven)
    with pytest.raises(fmt.FormatError, match=match):
        fmt.read_index(_bad(index, edit))
    (uneven / "index.json").write_bytes(_bad(index, edit))
    with pytest.raises(fmt.FormatError, match=match):
        MLMLoader(uneven, LoaderConfig(batch_size=16))


def test_deeply_nested_index_json_is_a_format_error_not_a_recursion_error():
    with pytest.raises(fmt.FormatError, match="not valid JSON"):
        fmt.read_index(b"[" * 200_000 + b"]" * 200_000)


def _huge_header_npy(dtype="<u2", shape=(1_000_000, 1_000_000)) -> bytes:
    """A .npy whose header declares 10**12 elements, followed by a few bytes of data."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 256


def test_an_npy_header_declaring_1e12_elements_is_refused_before_allocation():
    block = fmt.Block(tokens=np.ones((4, 16), np.uint16), lengths=np.full(4, 16, np.int32),
                      word_starts=np.ones((4, 16), bool), uids=np.arange(4, dtype=np.uint64))
    members = fmt.encode_block(block, vocab_size=100)
    for name, dtype, shape in [("tokens.npy", "<u2", (1_000_000, 1_000_000)), ("uids.npy", "<u8", (10**12,)),
                               ("tokens.npy", "<u2", (10**12, 16))]:
        with pytest.raises(fmt.FormatError, match=rf"member '{name}' (has shape|declares)"):
            fmt.decode_block({**members, name: _huge_header_npy(dtype, shape)}, seq_len=16, vocab_size=100)


def test_inspect_verify_reports_a_hostile_header_and_goes_on_to_check_the_other_shards(uneven, capsys):
    members = [(n, _huge_header_npy() if n == "000000.tokens.npy" else d)
               for n, d in read_tar(uneven / "shard-000001.tar")]
    rewrite_shard(uneven, 1, members)  # consistent sha256 and checksums: only the header is hostile
    assert inspect_main([str(uneven), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "BAD  shard-000001.tar: shard-000001.tar record 0 at offset 0: member 'tokens.npy' has shape" in out
    assert "OK   shard-000000.tar" in out and "OK   shard-000002.tar" in out


def test_a_member_larger_than_its_record_is_refused_before_it_is_read(uneven):
    path = uneven / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[124:136] = b"%011o\0" % (1 << 32)  # the first member's size field: 4 GiB
    data[148:156] = b"        "
    data[148:156] = b"%06o\0 " % (sum(data[:512]))  # a valid header checksum: only the size lies
    path.write_bytes(bytes(data))
    with pytest.raises(fmt.FormatError, match=r"claims 4294967296 bytes in a record of"):
        collect(MLMLoader(uneven, LoaderConfig(batch_size=16, check_records=False)))


def test_document_fields_restart_positions_and_mark_padding():
    starts = np.zeros((2, 8), bool)
    starts[0, [3, 6]] = True
    ids, positions = document_fields(starts, np.array([8, 5]))
    assert ids.dtype == np.int32 and positions.dtype == np.int64
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, -1, -1, -1]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]
    cu, longest = varlen_fields(starts, np.array([8, 5]))
    assert cu.dtype == np.int32 and cu.tolist() == [0, 3, 6, 8, 13, 16] and longest == 5


def test_v1_datasets_read_with_a_warning_and_one_document_per_sequence(tmp_path):
    root = shutil.copytree(V1, tmp_path / "v1")
    assert _index(root)["format_version"] == 1 and "checksums" not in _index(root)["shards"][0]
    with pytest.warns(fmt.OldFormatWarning, match="format v1 dataset: its records carry no checksums"):
        loader = MLMLoader(root, LoaderConfig(batch_size=10, varlen=True))
    batches = collect(loader)
    assert sum(len(b["uids"]) for b in batches) == 110
    for b in batches:
        real = b["attention_mask"].bool()
        assert (b["document_ids"][real] == 0).all() and (b["document_ids"][~real] == -1).all()
        assert (b["position_ids"] == np.arange(64)).all()
        assert b["cu_seqlens"][-1] == 10 * 64 and b["max_seqlen"] <= 64
    with pytest.warns(fmt.OldFormatWarning):
        assert inspect_main([str(root), "--verify"]) == 0


@pytest.mark.slow  # a Beam job and two worker processes: ~12 s on the shared 2-core machine
def test_v2_batches_carry_document_fields_for_every_worker_count_and_mask_place(tmp_path):
    """The v1 dataset's own input through today's job: same sequences, now with their document starts."""
    import subprocess
    import sys
    inputs = tmp_path / "sotu-3.jsonl"
    inputs.write_text("".join(Path(V1.parent / "sotu-6.jsonl").read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "v2"
    subprocess.run([sys.executable, "-m", "maskstream.pipeline.run", "--input", str(inputs), "--tokenizer",
                    str(V1.parents[2] / "data" / "tokenizers" / "bert-base-uncased.json"), "--output", str(out),
                    "--seq-len", "64", "--num-shards", "2", "--quiet"], check=True)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(V1.parents[2] / "data" / "tokenizers" / "bert-base-uncased.json"))
    docs = [",".join(map(str, tok.encode(json.loads(line)["text"], add_special_tokens=False).ids)) + ","
            for line in inputs.read_text().splitlines()]
    seen = []
    for cfg in (LoaderConfig(batch_size=10, varlen=True), LoaderConfig(batch_size=10, varlen=True, num_workers=2,
                                                                       mask_on="worker")):
        batches = collect(MLMLoader(out, cfg))
        seen.append([(b["uids"].tolist(), b["document_ids"].tolist(), b["position_ids"].tolist(),
                      b["cu_seqlens"].tolist(), b["max_seqlen"]) for b in batches])
    assert seen[0] == seen[1]
    ids = np.concatenate([np.array(b[1]) for b in seen[0]])
    assert ids.max() >= 1, "3 addresses packed together: some row holds a document start"
    segments = 0
    for b in batches:  # every document segment of every row is a piece of exactly one document fed in
        tokens = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])
        for row, doc in zip(tokens.tolist(), b["document_ids"].tolist(), strict=True):
            for d in range(max(doc) + 1):
                piece = [t for t, i in zip(row, doc, strict=True) if i == d and t not in (0, 101, 102)]
                text = ",".join(map(str, piece)) + ","
                found = sum(x.startswith(text) or "," + text in x for x in docs)
                assert found == 1 or found > 1 and len(piece) < 8, (piece, found)  # [CLS][SEP]: found 3
                segments += 1
    assert segments == len(ids) + int((np.diff(ids, axis=1) == 1).sum())
    rows = lambda root: sorted(t[0][:t[2]].tobytes() for t in read_sequences(root).values())  # noqa: E731
    assert rows(out) == rows(V1), "the same sequences as the v1 run of the same input"


def test_document_fields_can_be_left_out_and_varlen_needs_them(uneven):
    plain = collect(MLMLoader(uneven, LoaderConfig(batch_size=16, documents=False)), limit=1)[0]
    assert set(plain) == {"input_ids", "labels", "uids", "attention_mask"}
    full = collect(MLMLoader(uneven, LoaderConfig(batch_size=16, varlen=True)), limit=1)[0]
    assert set(full) == set(plain) | {"document_ids", "position_ids", "cu_seqlens", "max_seqlen"}
    assert isinstance(full["max_seqlen"], int) and full["cu_seqlens"][-1] == full["input_ids"].numel()
    with pytest.raises(ValueError, match="varlen=True needs documents=True"):
        LoaderConfig(varlen=True, documents=False)


def test_document_starts_round_trip_and_bad_ones_are_refused():
    block = fmt.Block(tokens=np.ones((3, 8), np.uint16), lengths=np.array([8, 8, 5], np.int32),
                      word_starts=np.ones((3, 8), bool), uids=np.arange(3, dtype=np.uint64),
                      doc_starts=np.zeros((3, 8), bool))
    assert "doc_starts.npy" not in fmt.encode_block(block, vocab_size=100)  # none inside a row: no member
    block.doc_starts[0, 3] = block.doc_starts[2, 4] = True
    members = fmt.encode_block(block, vocab_size=100)
    assert np.load(io.BytesIO(members["doc_starts.npy"])).tolist() == [3, 2 * 8 + 4]
    decoded = fmt.decode_block(members, seq_len=8, vocab_size=100, sequences=3)
    assert np.array_equal(decoded.doc_starts, block.doc_starts)
    for flat in ([3, 2], [8], [2 * 8 + 5], [24]):  # not increasing, a row's position 0, in padding, past the end
        buf = io.BytesIO()
        np.save(buf, np.array(flat, np.uint32))
        with pytest.raises(fmt.FormatError, match="doc_starts.npy"):
            fmt.decode_block({**members, "doc_starts.npy": buf.getvalue()}, seq_len=8, vocab_size=100)
