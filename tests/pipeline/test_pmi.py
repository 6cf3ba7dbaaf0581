"""PMI units: n-gram counts and PMI_n against plain-Python brute force, greedy matching, the Beam stages'
bytes with 1 and 2 workers, the vocabulary's index.json entry checked."""
from __future__ import annotations

import collections
import itertools
import json
import math

import numpy as np
import pytest
from tokenizers import Tokenizer

from maskstream.loader import format as fmt
from maskstream.pipeline import pmi
from maskstream.pipeline.encoder import Encoder
from maskstream.pipeline.packing import TokDoc


@pytest.fixture(scope="module")
def tokdocs(bert_json, sotu_texts):
    """Four SOTU addresses as tokenized documents (about 10k words)."""
    encoder = Encoder(Tokenizer.from_file(str(bert_json)))
    return [TokDoc("sotu", i, ids, ws) for i, (ids, ws) in enumerate(encoder.encode(sotu_texts[:4]))]


def brute_words(d) -> list[tuple[int, ...]]:
    """A document's words as tuples of token ids, by a plain Python loop."""
    words = []
    for i, (t, start) in enumerate(zip(d.ids.tolist(), d.word_starts.tolist(), strict=True)):
        if i == 0 or start:
            words.append([])
        words[-1].append(t)
    return [tuple(w) for w in words]


def brute_counts(tokdocs, max_n):
    """{n-gram as a tuple of words: count}, words as tuples of token ids, by plain Python loops."""
    counts = collections.Counter()
    for d in tokdocs:
        words = brute_words(d)
        for n in range(1, max_n + 1):
            for i in range(len(words) - n + 1):
                counts[tuple(words[i:i + n])] += 1
    return counts


def brute_pmi(ngram, counts, positions):
    """PMI_n by enumerating every segmentation into >= 2 contiguous pieces."""
    n, best = len(ngram), -math.inf
    log_p = lambda s: math.log(counts[s] / positions[len(s)])  # noqa: E731
    for cuts in itertools.chain.from_iterable(itertools.combinations(range(1, n), k) for k in range(1, n)):
        bounds = (0, *cuts, n)
        best = max(best, sum(log_p(ngram[a:b]) for a, b in itertools.pairwise(bounds)))
    return log_p(ngram) - best


def test_counts_positions_and_pmi_equal_a_brute_force_count(tokdocs):
    brute = brute_counts(tokdocs, 5)
    # two groups counted apart, then merged (as the Beam stages do)
    hashes, counts = pmi.merge_counts([pmi.count_group(tokdocs[:1], 5), pmi.count_group(tokdocs[1:], 5)])
    assert len(hashes) == len(brute)                  # no two n-grams of the corpus share a hash
    by_n = collections.defaultdict(list)
    for g in brute:
        by_n[len(g)].append(g)
    for n, grams in by_n.items():
        at = np.searchsorted(hashes, pmi.ngram_hashes(pmi.word_matrix(grams), n))
        assert (hashes[at] == pmi.ngram_hashes(pmi.word_matrix(grams), n)).all()
        assert counts[at].tolist() == [brute[g] for g in grams]
    positions = pmi.count_positions(tokdocs, 5)
    assert positions == {n: sum(c for g, c in brute.items() if len(g) == n) for n in range(1, 6)}
    for n in range(2, 6):
        grams = sorted(g for g in by_n[n] if brute[g] >= 3)[:200]
        got = pmi.pmi_scores(grams, hashes, counts, positions)
        assert np.allclose(got, [brute_pmi(g, brute, positions) for g in grams], rtol=0, atol=1e-9)


def test_vocabulary_is_the_top_pmi_per_length_with_ties_by_ngram(tokdocs):
    config = pmi.PmiConfig(max_ngrams=40, min_count=3)
    brute = brute_counts(tokdocs, 5)
    positions = pmi.count_positions(tokdocs, 5)
    hashes, counts = pmi.count_group(tokdocs, 5)
    keep = counts >= config.min_count
    words = pmi.ngrams_of(tokdocs, hashes[keep], 5)
    vocab = pmi.select_vocabulary(hashes[keep], counts[keep], words, positions, config)
    expected = []
    for n, quota in pmi.quotas(config).items():
        scored = [(round(-brute_pmi(g, brute, positions), 9), g) for g, c in brute.items() if len(g) == n and c >= 3]
        expected += [g for s, g in sorted(scored) if s < 0][:quota]
    got = [tuple(tuple(w) for w in g["words"]) for g in vocab["ngrams"]]
    assert got == expected and pmi.quotas(config) == {2: 20, 3: 7, 4: 7, 5: 6}
    assert all(g["count"] == brute[k] for g, k in zip(vocab["ngrams"], got, strict=True))
    assert json.loads(pmi.vocabulary_bytes(vocab)) == vocab


def test_units_are_the_greedy_longest_match_left_to_right(tokdocs):
    d = tokdocs[0]
    words = brute_words(d)
    # a vocabulary whose n-grams overlap: "a b c", "b c d e", "c d" style chains taken from the text itself
    grams = [tuple(words[i:i + n]) for i, n in ((10, 3), (11, 4), (12, 2), (40, 5), (41, 2), (100, 2))]
    grams += [tuple(words[i:i + 2]) for i in range(200, 400, 7)]
    matcher = pmi.Matcher({"ngrams": [{"words": [list(w) for w in g]} for g in grams]})
    vocab, units, i = set(grams), [], 0
    while i < len(words):
        n = next((n for n in range(5, 1, -1) if tuple(words[i:i + n]) in vocab), 1)
        units.append(n)
        i += n
    starts = matcher.unit_starts(d.ids, d.word_starts)
    assert np.flatnonzero(starts).tolist() == pmi.word_firsts(d.word_starts)[np.cumsum([0] + units[:-1])].tolist()
    assert not (starts & ~d.word_starts).any()


def test_bad_pmi_settings_are_refused_naming_the_flag():
    from maskstream.errors import UserError
    for kwargs, flag in (({"min_count": 1}, "--pmi-min-count"), ({"max_ngrams": 0}, "--pmi-max-ngrams"),
                         ({"max_n": 9}, "--pmi-max-n")):
        with pytest.raises(UserError, match=flag):
            pmi.PmiConfig(**kwargs)


@pytest.mark.slow
def test_same_bytes_from_one_and_two_workers_and_units_in_every_record(job, hashes, bert_json, sotu_subset,
                                                                      tmp_path):
    flags = ("--selection", "pmi", "--pmi-min-count", 3, "--pmi-max-ngrams", 500, "--num-shards", 3)
    one = job([sotu_subset], bert_json, tmp_path / "one", "--local-mode", "in_memory", *flags)
    two = job([sotu_subset], bert_json, tmp_path / "two", "--local-mode", "multi_processing",
              "--direct_num_workers", 2, *flags)
    a, b = hashes(tmp_path / "one"), hashes(tmp_path / "two")   # index.json names its output folder
    assert a.pop("index.json") and b.pop("index.json") and a == b and pmi.VOCAB_FILE in a
    assert one["shards"] == two["shards"] and one["units"] == two["units"] and one["units"]["ngrams"] == 500
    data = (tmp_path / "one" / pmi.VOCAB_FILE).read_bytes()
    assert pmi.index_entry(json.loads(data))["sha256"] == one["units"]["sha256"]
    # every record stores unit starts, a subset of its word starts with fewer units than words
    from helpers import read_tar
    units = words = 0
    for shard in one["shards"]:
        for _, members in itertools.groupby(read_tar(tmp_path / "one" / shard["name"]), lambda m: m[0].split(".")[0]):
            members = {name.split(".", 1)[1]: data for name, data in members}
            block = fmt.decode_block(members, seq_len=one["seq_len"], vocab_size=one["tokenizer"]["vocab_size"])
            assert block.unit_starts is not None
            units, words = units + block.unit_starts.sum(), words + block.word_starts.sum()
    assert 0.5 * words < units < words
    # the loader masks it with the stored selection, pmi
    from maskstream.loader.stream import LoaderConfig, MLMLoader
    loader = MLMLoader(str(tmp_path / "one"), LoaderConfig(batch_size=16))
    assert loader.masking.selection == "pmi" and (next(iter(loader))["labels"] != -100).any()


def test_index_units_entry_is_checked(tmp_path):
    from helpers import build_dataset
    index = json.loads((build_dataset(tmp_path / "d", [[8]]) / "index.json").read_text())
    good = {"file": "pmi_ngrams.json", "sha256": "0" * 64, "settings": {"max_n": 5, "max_ngrams": 10, "min_count": 3},
            "ngrams": 3, "ngrams_by_n": {"2": 2, "3": 1}}
    fmt.read_index(json.dumps({**index, "units": good}))
    for bad, message in (({"file": "../x.json"}, "units.file"), ({"sha256": "zz"}, "units.sha256"),
                         ({"ngrams": 11}, "units.ngrams"), ({"ngrams_by_n": {"2": 2}}, "sums to 2"),
                         ({"ngrams_by_n": {"7": 3}}, "length"), ({"settings": {"max_n": 5}}, "units.settings")):
        with pytest.raises(fmt.FormatError, match=message):
            fmt.read_index(json.dumps({**index, "units": {**good, **bad}}))


def test_cjk_characters_are_words_with_berts_tokenizer(bert_json):
    encoder = Encoder(Tokenizer.from_file(str(bert_json)))
    ids, ws = encoder.encode(["debian 参考手册 是一本书"])[0]
    doc = TokDoc("zh", 0, ids, ws)
    assert pmi.count_positions([doc], 2) == {1: 9, 2: 8}   # "debian" and eight characters
    assert len(pmi.count_group([doc], 1)[0]) == len({tuple(w) for w in brute_words(doc)})


@pytest.mark.slow
def test_static_pmi_masks_stored_equal_the_loader_rule_on_the_stored_units(job, bert_json, sotu_subset, tmp_path):
    import torch
    from helpers import read_tar

    from maskstream.loader.masking import MaskingConfig, Vocab, mask_batch
    index = job([sotu_subset], bert_json, tmp_path / "s", "--local-mode", "in_memory", "--selection", "pmi",
                "--pmi-min-count", 3, "--masking", "static", "--static-copies", 2, "--seed", 7, "--num-shards", 1)
    members = collections.defaultdict(dict)
    for name, data in read_tar(tmp_path / "s" / index["shards"][0]["name"]):
        key, suffix = name.split(".", 1)
        members[key][suffix] = data
    for record in members.values():
        block = fmt.decode_block(record, seq_len=index["seq_len"], vocab_size=index["tokenizer"]["vocab_size"],
                                 static_copies=2)
        for epoch in range(2):
            inputs, labels = mask_batch(
                torch.from_numpy(block.tokens.astype(np.int64)), torch.from_numpy(block.unit_starts),
                torch.from_numpy(block.lengths.astype(np.int64)),
                torch.from_numpy(block.uids.astype(np.uint64).view(np.int64)),  # a writable copy
                seed=7, epoch=epoch, config=MaskingConfig(selection="pmi"), vocab=Vocab.from_index(index))
            assert (block.static_selected[:, epoch] == (labels != -100).numpy()).all()
            assert (block.static_inputs[:, epoch] == inputs.numpy()).all()
