"""`maskstream inspect`: summary, --verify (good and corrupted), --show, and --dump-masks across worker counts."""
import json
import re
from pathlib import Path

import pytest
from helpers import TOKENIZER, build_dataset

from maskstream.loader.inspector import main

ROOT = Path(__file__).resolve().parents[2]


def test_summary_shows_the_manifest(uneven, capsys):
    assert main([str(uneven)]) == 0
    out = capsys.readouterr().out
    assert "sequences  487 of 128 tokens" in out and "shards     3," in out and "10 records" in out
    assert "masking    dynamic" in out and "vocab 30,522" in out


def test_verify_passes_a_good_dataset_and_names_a_corrupted_shard(uneven, capsys):
    assert main([str(uneven), "--verify"]) == 0
    assert "all 3 shards verified" in capsys.readouterr().out
    path = uneven / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # one flipped bit inside a member: same size, different hash
    path.write_bytes(bytes(data))
    assert main([str(uneven), "--verify"]) == 1
    captured = capsys.readouterr()
    assert "BAD  shard-000001.tar: sha256" in captured.out and "OK   shard-000002.tar" in captured.out
    assert "bad shard(s): shard-000001.tar" in captured.err


def test_verify_names_a_truncated_and_a_missing_shard(uneven, capsys):
    (uneven / "shard-000000.tar").write_bytes((uneven / "shard-000000.tar").read_bytes()[:10240])
    (uneven / "shard-000002.tar").unlink()
    assert main([str(uneven), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "BAD  shard-000000.tar: 10,240 bytes, index.json says" in out
    assert "BAD  shard-000002.tar:" in out and "missing" in out


def test_show_prints_sequences_with_their_masks_marked(uneven, capsys):
    assert main([str(uneven), "--show", "2", "--epoch", "1", "--tokenizer", str(TOKENIZER)]) == 0
    out = capsys.readouterr().out
    assert out.count("\nuid ") == 2 and "[MASK/" in out and "[CLS]" in out and "[SEP]" in out
    assert "##" not in out.replace("->##", ""), "word pieces are glued back into words"


@pytest.mark.slow
def test_dump_masks_is_identical_for_any_worker_count_and_batch_size(uneven, tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert main([str(uneven), "--dump-masks", str(a), "--epoch", "2", "--num-workers", "0"]) == 0
    assert main([str(uneven), "--dump-masks", str(b), "--epoch", "2", "--num-workers", "2"]) == 0
    assert a.read_text() == b.read_text()
    lines = [json.loads(x) for x in a.read_text().splitlines()]
    assert len(lines) == 487 and set(lines[0]) == {"step", "source", "uid", "input_ids", "labels"}
    assert re.fullmatch("[0-9a-f]{16}", lines[0]["uid"])   # the one uid spelling, as --show prints it
    assert lines[-1]["step"] == 486 and lines[0]["source"] == str(uneven)
    assert main([str(uneven), "--dump-masks", str(c), "--epoch", "2", "--batch-size", "16", "--num-workers", "2",
                 "--rank", "1", "--world-size", "2", "--limit", "50"]) == 0
    masks = lambda x: (x["input_ids"], x["labels"])  # noqa: E731 (the step depends on the batch size)
    by_uid = {x["uid"]: masks(x) for x in lines}
    others = [json.loads(x) for x in c.read_text().splitlines()]
    assert len(others) == 50 and all(by_uid[x["uid"]] == masks(x) for x in others)
    assert [x["step"] for x in others[::16]] == [0, 1, 2, 3]


def test_a_mixture_file_is_summarized_and_its_dumped_masks_carry_step_and_source(uneven, tmp_path, capsys):
    build_dataset(tmp_path / "small", [[20, 20]])  # named by a path relative to the mixture file
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"sources": [{"path": str(uneven), "weight": 3, "name": "big"},
                                           {"path": "small", "weight": 1}]}))
    assert main([str(mix)]) == 0
    out = capsys.readouterr().out
    assert "2 sources" in out and "source     big: share 0.7500" in out and "source     small: share 0.2500" in out
    dump = tmp_path / "m.jsonl"
    assert main([str(mix), "--dump-masks", str(dump), "--batch-size", "8", "--limit", "40"]) == 0
    lines = [json.loads(x) for x in dump.read_text().splitlines()]
    assert [x["step"] for x in lines[::8]] == [0, 1, 2, 3, 4]
    assert [x["source"] for x in lines[:8]] == ["big"] * 6 + ["small"] * 2, "6 of 8 from big, then 2 from small"


def test_byte_level_bpe_reads_as_text_with_its_own_mask_token():
    from maskstream.loader.inspector import render
    from maskstream.loader.masking import IGNORE_INDEX
    from maskstream.loader.text import decode_units, uid_text
    from maskstream.pipeline.tokenizer import convert_gpt2
    tok = convert_gpt2(str(ROOT / "data/tokenizers/gpt2-vocab.json"), str(ROOT / "data/tokenizers/gpt2-merges.txt"))
    ids = tok.encode("The state of the Union「中国」.\nNew line").ids
    mask_id = tok.token_to_id("<mask>")
    units = decode_units(tok, ids)
    assert "".join(u.text for u in units) == "<s>The state of the Union「中国」.\nNew line</s>"
    assert any(len(u.positions) > 1 for u in units)   # a character split over two byte-level tokens shown once
    union = next(i for i, u in enumerate(units) if u.text == " Union")
    labels = [IGNORE_INDEX] * len(ids)
    masked = list(ids)
    labels[units[union].positions[0]] = ids[units[union].positions[0]]
    masked[units[union].positions[0]] = mask_id
    line = render(tok, masked, labels, len(ids), mask_id)
    assert line == "<s>The state of the <mask/Union>「中国」.⏎New line</s>", line
    assert not set("ĠĊãĢ") & set(line)
    assert uid_text(-1) == "ffffffffffffffff" and uid_text(255) == "00000000000000ff"
