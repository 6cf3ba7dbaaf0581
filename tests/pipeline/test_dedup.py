"""Dedup's record logic without Beam (pipeline/dedup.py) on real text with planted copies, and the Dedup stage
in the job: which copy survives, the rejects, and the same bytes with one or two workers."""
from __future__ import annotations

import gzip
import json
from collections import defaultdict

import pytest
from helpers import DATA, changed, sotu_texts

from maskstream.errors import UserError
from maskstream.pipeline import dedup

CONFIG = dedup.DedupConfig(mode="minhash")
PERMS = dedup.Permutations.of(CONFIG.bands * CONFIG.rows)


def find_drops(texts: list[str], config=CONFIG) -> dict:
    """The whole dedup decision in plain functions, as the Beam stage wires it: ids are list positions."""
    groups = defaultdict(list)
    for i, text in enumerate(texts):
        key = dedup.exact_key(text)
        groups[b"x" + key].append((i, key, None))
        sig = dedup.document_signature(text, config, PERMS)
        for band in dedup.band_keys(sig, config.bands, config.rows):
            groups[b"b" + band].append((i, key, sig))
    pairs, keys = [], {}
    for name, members in groups.items():
        keys.update((m[0], m[1]) for m in members)
        if name.startswith(b"x"):
            pairs += dedup.exact_pairs([m[0] for m in members])
        else:
            pairs += dedup.bucket_pairs(members, config.threshold)
    return dedup.drops(pairs, keys)


def test_exact_key_folds_case_whitespace_and_unicode_composition():
    assert dedup.exact_key("Café au  lait\n") == dedup.exact_key("  CAFE\u0301 AU lait")
    assert dedup.exact_key("café au lait") != dedup.exact_key("cafe au lait")


def test_planted_copies_in_real_addresses_are_found_and_no_original_is_dropped():
    originals = sotu_texts()[:40]
    plants = {}      # position in the corpus -> (original's position, expected reason)
    texts = list(originals)
    for i in range(0, 40, 2):
        texts.append(originals[i].upper() if i % 4 else "  " + originals[i])      # exact copies, case and spacing
        plants[len(texts) - 1] = (i, dedup.DUPLICATE)
        texts.append(changed(originals[i + 1], 0.02, seed=i))                      # 2% of the words changed
        plants[len(texts) - 1] = (i + 1, dedup.NEAR_DUPLICATE)
    found = find_drops(texts)
    assert all(d >= 40 for d in found), "an original address was dropped"
    right = [d for d, (reason, kept) in found.items() if plants[d] == (kept, reason)]
    exact = [d for d in plants if plants[d][1] == dedup.DUPLICATE]
    assert set(exact) <= set(right)                                  # every exact copy, kept = the original
    near = [d for d in plants if plants[d][1] == dedup.NEAR_DUPLICATE]
    assert len(set(near) & set(right)) >= 0.9 * len(near)            # recall on near copies
    assert len(right) == len(found)                                  # precision: every drop names its original


def test_the_smallest_id_survives_whatever_the_order_of_pairs():
    keys = dict.fromkeys("abcd", b"k") | {"e": b"other"}
    pairs = [("c", "d"), ("b", "c"), ("a", "d"), ("a", "e")]
    for order in (pairs, pairs[::-1], pairs[1:] + pairs[:1]):
        assert dedup.drops(order, keys) == {"b": ("duplicate", "a"), "c": ("duplicate", "a"),
                                            "d": ("duplicate", "a"), "e": ("near_duplicate", "a")}


def test_chinese_text_is_shingled_by_characters_and_near_copies_match():
    with gzip.open(DATA / "debian-reference-zh.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f][:6]
    assert dedup.is_cjk(texts[1])
    one = dedup.document_signature(texts[1], CONFIG, PERMS)
    chars = list(texts[1])
    for i in range(0, len(chars), 100):          # 1% of the characters changed
        chars[i] = "变"
    copy = dedup.document_signature("".join(chars), CONFIG, PERMS)
    assert dedup.similarity(one, copy) >= CONFIG.threshold
    assert dedup.similarity(one, dedup.document_signature(texts[2], CONFIG, PERMS)) < 0.3


def test_token_hashes_ignore_punctuation_and_position():
    a = dedup.token_hashes(dedup.normalize("Hello, world! hello"))
    assert len(a) == 3 and a[0] == a[2] and a[0] != a[1]
    b = dedup.token_hashes(dedup.normalize("world hello"))
    assert list(b) == [a[1], a[0]]


def test_bad_settings_are_refused_with_the_flag_to_fix():
    with pytest.raises(UserError, match="--minhash-threshold"):
        dedup.DedupConfig(mode="minhash", threshold=1.5)
    with pytest.raises(UserError, match="--dedup"):
        dedup.DedupConfig(mode="fuzzy")


@pytest.mark.slow
def test_the_job_drops_planted_copies_keeping_the_first_and_naming_it(planted, bert_json, tmp_path, job, hashes):
    # NOTE: the same job on two Dask worker processes writes the same bytes: tests/pipeline/test_dask.py
    flags = ("--dedup", "minhash", "--num-shards", 2)
    one = job(planted, bert_json, tmp_path / "one", "--direct_running_mode=in_memory", *flags)
    again = job(planted, bert_json, tmp_path / "again", "--direct_running_mode=in_memory", *flags)
    c = one["counts"]
    assert c["documents_read"] == 15 == c["documents_written"] + c["documents_rejected"]
    assert c["rejects_by_reason"] == {"duplicate": 2, "near_duplicate": 1}
    rejects = [json.loads(line) for line in (tmp_path / "one" / "rejects" / "rejects.jsonl").read_text().splitlines()]
    a = str(planted[0])
    assert [(r["position"], r["reason"], r["detail"]) for r in rejects] == [
        (0, "duplicate", f"kept {a}:3"), (1, "near_duplicate", f"kept {a}:5"), (2, "duplicate", f"kept {a}:3")]
    assert again["counts"] == c
    x, y = hashes(tmp_path / "one"), hashes(tmp_path / "again")
    assert {k: v for k, v in x.items() if k != "index.json"} == {k: v for k, v in y.items() if k != "index.json"}


def test_curation_switched_off_keys_nothing_and_switched_on_changes_the_uids():
    from maskstream.pipeline import run as pipeline_run
    from maskstream.pipeline.config import config_from_args, data_hash

    def config(*flags):
        args, _ = pipeline_run.parse(["--input", "a.jsonl", "--tokenizer", "t.json", "--output", "out", *flags])
        args.tokenizer_sha256 = "0" * 64
        return config_from_args(args)
    off = config()
    before = {k: v for k, v in off.to_dict().items() if k not in ("filters", "dedup")}   # a config of before dedup
    assert off.data_hash() == data_hash(before)
    assert len({off.data_hash(), config("--dedup", "exact").data_hash(), config("--filters", "gopher").data_hash(),
                config("--dedup", "minhash", "--minhash-bands", "20").data_hash()}) == 4


def test_an_oversized_documents_parts_are_judged_whole_and_dropped_together():
    from maskstream.pipeline import curation
    from maskstream.pipeline.readers import Doc
    from maskstream.pipeline.transforms import DATA, REJECT
    docs = [Doc("b.jsonl", 4, 0, 2, "first half, "), Doc("b.jsonl", 4, 1, 2, "second half"),
            Doc("b.jsonl", 5, 0, 2, "another document")]
    assert curation.documents(docs)[4] == ("first half, second half", docs[:2])
    element = (("b.jsonl", 2), {"docs": [docs], "drops": [(4, "duplicate", ("a.jsonl", 9, 0))]})
    out = list(curation.apply_drops(element))
    assert out[0] == (DATA, (("b.jsonl", 2), docs[2:]))
    assert out[1][0] == REJECT and out[1][1].position == 4 and out[1][1].detail == "kept a.jsonl:9"
    assert len(out) == 2                           # one reject for the document, not one per part
