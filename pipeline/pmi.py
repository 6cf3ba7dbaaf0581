"""PMI masking units (Levine et al., ICLR 2021): n-gram counts, PMI_n scores, the vocabulary, unit starts.

Plain Python/numpy functions; the Beam stages that call them are in pipeline/pmi_stages.py.

Words are the tokenizer's words (a token starts one where its word id changes: TokDoc.word_starts), so a unit
maps to a token span; a word is the tuple of its token ids and an n-gram the tuple of its words. With BERT's
normalizer every CJK character is a word of its own (handle_chinese_chars); a byte-level BPE tokenizer keeps a
run of CJK characters as one word. n-grams never cross a document.

PMI_n of an n-gram w (the paper's definition) is the smallest, over every segmentation of w into two or more
contiguous pieces, of log p(w) / prod p(piece), where p(s) = count(s) / (k-gram positions of the corpus) for
a piece of k words. Kept: n-grams of 2..max_n words counted at least min_count times, with PMI_n > 0, the
highest per length, bigrams taking half the cap and the longer lengths sharing the rest (the paper's 800K
vocabulary is about half bigrams). Ties go to the n-gram itself, so the vocabulary is a function of the
counts only, whatever the bundles or workers that made them.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math

import numpy as np

from maskstream.errors import UserError
from maskstream.loader.order import mix64

VOCAB_FILE = "pmi_ngrams.json"
MAX_N = 5


@dataclasses.dataclass(frozen=True, kw_only=True)
class PmiConfig:
    """Which n-grams become masking units."""
    max_n: int = MAX_N          # longest n-gram, in words (the paper: 5)
    max_ngrams: int = 20_000    # cap (the paper: 800K over Wikipedia+BookCorpus, ~3B words)
    min_count: int = 10         # n-grams seen fewer times are not scored (their PMI is noise)

    def __post_init__(self):
        if not 2 <= self.max_n <= 8:
            raise UserError(f"--pmi-max-n {self.max_n} is not valid; allowed: 2..8 (the paper uses 5)")
        if self.max_ngrams < 1:
            raise UserError(f"--pmi-max-ngrams {self.max_ngrams} is not valid; allowed: >= 1, e.g. 20000")
        if self.min_count < 2:
            raise UserError(f"--pmi-min-count {self.min_count} is not valid; allowed: >= 2 (a single sighting "
                            "says nothing of correlation), e.g. 10")


# ---- counting (by 64-bit n-gram hashes: numpy arrays, not Python tuples) ------------------------------------
# NOTE: counting 5M distinct n-grams of SOTU as tuples took 64 s and 1.2 GB; as uint64 hashes it takes a few
# seconds and 16 bytes each. Two n-grams sharing a hash (p ~ 1e-6 at 5M) would share a count, the same on
# every run and worker; the n-grams kept are recovered as words by a second pass (ngrams_of).

_TOKEN, _WORD, _LENGTH = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9)


def word_firsts(word_starts: np.ndarray) -> np.ndarray:
    """(W,) int64: the first token of each word of a non-empty document (its first token always starts one)."""
    firsts = np.flatnonzero(word_starts)
    return firsts if len(firsts) and firsts[0] == 0 else np.concatenate([[0], firsts]).astype(np.int64)


def word_hashes(ids: np.ndarray, word_starts: np.ndarray) -> np.ndarray:
    """(W,) uint64: a hash of each word's token ids, in order."""
    if len(ids) == 0:
        return np.zeros(0, np.uint64)
    starts = word_firsts(word_starts)
    within = np.arange(len(ids)) - np.repeat(starts, np.diff(np.append(starts, len(ids))))
    with np.errstate(over="ignore"):
        tokens = mix64(ids.astype(np.uint64) * _TOKEN + within.astype(np.uint64))
        return mix64(np.add.reduceat(tokens, starts))


def ngram_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """(W - n + 1,) uint64: the hash of every n-gram of a document's word hashes (or (m, n) rows: (m,))."""
    windows = np.lib.stride_tricks.sliding_window_view(words, n, axis=-1) if words.ndim == 1 else words
    salts = (np.arange(1, n + 1, dtype=np.uint64) * _WORD)
    with np.errstate(over="ignore"):
        return mix64(mix64(windows ^ salts).sum(axis=-1, dtype=np.uint64) + np.uint64(n) * _LENGTH)


def count_group(tokdocs, max_n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes uint64, counts int64) of every n-gram (n = 1..max_n) of a pack group's documents (TokDocs)."""
    parts = []
    for d in tokdocs:
        words = word_hashes(d.ids, d.word_starts)
        parts += [ngram_hashes(words, n) for n in range(1, min(max_n, len(words)) + 1)]
    return np.unique(np.concatenate(parts) if parts else np.zeros(0, np.uint64), return_counts=True)


def merge_counts(parts) -> tuple[np.ndarray, np.ndarray]:
    """Sum several (hashes, counts) into one, hashes sorted and unique."""
    parts = list(parts)
    hashes = np.concatenate([np.zeros(0, np.uint64)] + [h for h, _ in parts])
    counts = np.concatenate([np.zeros(0, np.int64)] + [c for _, c in parts]).astype(np.int64)
    order = np.argsort(hashes, kind="stable")
    hashes, counts = hashes[order], counts[order]
    firsts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]]) if len(hashes) else np.zeros(0, np.int64)
    return hashes[firsts], np.add.reduceat(counts, firsts) if len(firsts) else counts


def count_positions(tokdocs, max_n: int) -> dict[int, int]:
    """{n: number of n-gram positions} (the denominator of p for n-grams of n words) of TokDocs."""
    lengths = [int(np.count_nonzero(d.word_starts[1:])) + 1 for d in tokdocs if len(d.ids)]  # as word_firsts counts
    return {n: sum(max(0, m - n + 1) for m in lengths) for n in range(1, max_n + 1)}


def member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values in sorted_set, as a bool array.

    NOTE: a binary search: np.isin re-sorts (or re-hashes) the set on every call, 5x the time of the whole
    word pass here."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    return sorted_set[np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)] == values


def ngrams_of(tokdocs, wanted: np.ndarray, max_n: int) -> dict[int, tuple]:
    """{hash: n-gram as a tuple of words} for the wanted hashes (sorted uint64) found in TokDocs."""
    found = {}
    for d in tokdocs:
        words, hashes = None, word_hashes(d.ids, d.word_starts)
        for n in range(1, min(max_n, len(hashes)) + 1):
            h = ngram_hashes(hashes, n)
            hits = np.flatnonzero(member(h, wanted))
            firsts, at = np.unique(h[hits], return_index=True)   # each hash once per document
            for key, i in zip(firsts.tolist(), hits[at].tolist(), strict=True):
                if key not in found:
                    if words is None:   # once per document; only the words of new hits become tuples
                        words = d.ids.tolist(), np.append(word_firsts(d.word_starts), len(d.ids)).tolist()
                    ids, bounds = words
                    found[key] = tuple(tuple(ids[bounds[j]:bounds[j + 1]]) for j in range(i, i + n))
    return found


# ---- scoring and selection ----------------------------------------------------------------------------------

def word_matrix(ngrams: list[tuple]) -> np.ndarray:
    """(m, n) uint64: the word hashes of m n-grams of one length n (as word_hashes gives them in a document)."""
    flat = [w for g in ngrams for w in g]
    ids = np.array([t for w in flat for t in w], dtype=np.uint32)
    starts = np.zeros(len(ids), dtype=bool)
    starts[np.cumsum([0] + [len(w) for w in flat[:-1]])] = True
    return word_hashes(ids, starts).reshape(len(ngrams), -1)


def pmi_scores(ngrams: list[tuple], hashes: np.ndarray, counts: np.ndarray, positions: dict[int, int]) -> np.ndarray:
    """(m,) float64 PMI_n of m n-grams of one length n: the min over segmentations into >= 2 pieces of
    log p(ngram) - sum log p(piece). hashes/counts: every n-gram counted (sorted hashes), pieces included."""
    n = len(ngrams[0])
    words = word_matrix(ngrams)
    log_p = {}
    for lo in range(n):
        for hi in range(lo + 1, n + 1):
            at = np.searchsorted(hashes, ngram_hashes(words[:, lo:hi], hi - lo))
            log_p[lo, hi] = np.log(counts[at].astype(np.float64)) - math.log(positions[hi - lo])
    best = {}   # (lo, hi) -> max over all segmentations of [lo, hi), the whole span included
    for width in range(1, n + 1):
        for lo in range(n - width + 1):
            hi = lo + width
            best[lo, hi] = functools.reduce(np.maximum, [best[lo, k] + best[k, hi] for k in range(lo + 1, hi)],
                                            log_p[lo, hi])
    return log_p[0, n] - functools.reduce(np.maximum, [best[0, k] + best[k, n] for k in range(1, n)])


def quotas(config: PmiConfig) -> dict[int, int]:
    """{n: most n-grams of n words kept}: half the cap to bigrams, the rest shared by the longer lengths."""
    if config.max_n == 2:
        return {2: config.max_ngrams}
    longer = config.max_ngrams - config.max_ngrams // 2
    share, extra = divmod(longer, config.max_n - 2)
    return {2: config.max_ngrams // 2, **{n: share + (n - 3 < extra) for n in range(3, config.max_n + 1)}}


def select_vocabulary(hashes: np.ndarray, counts: np.ndarray, ngrams: dict[int, tuple], positions: dict[int, int],
                      config: PmiConfig) -> dict:
    """The vocabulary dict stored beside index.json: settings, totals and the kept n-grams with count and PMI_n.

    hashes/counts: every n-gram counted at least min_count times (sorted hashes; a piece of an n-gram is counted
    at least as often as the n-gram, so every piece is there); ngrams: the words of each such hash."""
    kept = []
    for n, quota in quotas(config).items():
        group = sorted(ngrams[int(h)] for h in hashes if len(ngrams[int(h)]) == n)
        if not group:
            continue
        # NOTE: rounded, so that values equal in exact arithmetic tie (and go to the n-gram) whatever the float path
        scores = np.round(pmi_scores(group, hashes, counts, positions), 9)
        at = np.searchsorted(hashes, ngram_hashes(word_matrix(group), n))
        # highest PMI_n first, ties by the n-gram itself (group is sorted, the sort is stable)
        for i in [i for i in np.argsort(-scores, kind="stable") if scores[i] > 0][:quota]:
            kept.append({"words": [list(w) for w in group[i]], "count": int(counts[at[i]]),
                         "pmi": round(float(scores[i]), 6)})
    return {"settings": dataclasses.asdict(config), "positions": {str(n): positions[n] for n in sorted(positions)},
            "ngrams": kept}


def vocabulary_bytes(vocab: dict) -> bytes:
    return (json.dumps(vocab, sort_keys=True, separators=(",", ":")) + "\n").encode()


def index_entry(vocab: dict) -> dict:
    """What index.json says of the vocabulary file (key "units")."""
    data = vocabulary_bytes(vocab)
    per_n = collections.Counter(len(g["words"]) for g in vocab["ngrams"])
    return {"file": VOCAB_FILE, "sha256": hashlib.sha256(data).hexdigest(), "settings": vocab["settings"],
            "ngrams": len(vocab["ngrams"]), "ngrams_by_n": {str(n): per_n[n] for n in sorted(per_n)}}


# ---- matching -----------------------------------------------------------------------------------------------

class Matcher:
    """Greedy longest match, left to right, of a vocabulary's n-grams over a document's words: at each word the
    longest n-gram starting there is one unit, else the word alone; the scan goes on after the unit. n-grams
    are compared by their hashes (as counted)."""

    def __init__(self, vocab: dict):
        by_n = collections.defaultdict(list)
        for g in vocab["ngrams"]:
            by_n[len(g["words"])].append(tuple(tuple(w) for w in g["words"]))
        self.hashes = {n: np.sort(ngram_hashes(word_matrix(gs), n)) for n, gs in by_n.items()}

    def unit_lengths(self, words: np.ndarray) -> np.ndarray:
        """(W,) int64: words in the unit starting at each word (0 inside a unit): word hashes in."""
        longest = np.zeros(len(words), dtype=np.int64)   # the longest vocabulary n-gram starting at each word
        for n in sorted(self.hashes):
            if n <= len(words):
                hit = np.flatnonzero(member(ngram_hashes(words, n), self.hashes[n]))
                longest[hit] = n
        units = np.ones(len(words), dtype=np.int64)
        end = 0
        for i in np.flatnonzero(longest).tolist():   # NOTE: a Python loop only over the words that start a match
            if i >= end:
                units[i], end = longest[i], i + longest[i]
                units[i + 1:end] = 0
        return units

    def unit_starts(self, ids: np.ndarray, word_starts: np.ndarray) -> np.ndarray:
        """(n,) bool: True at the first token of each unit (a subset of the word starts)."""
        if len(ids) == 0:
            return np.zeros(0, dtype=bool)
        first = word_firsts(word_starts)
        starts = np.zeros(len(ids), dtype=bool)
        starts[first[self.unit_lengths(word_hashes(ids, word_starts)) > 0]] = True
        return starts
