"""Deduplication's record logic, without Beam: normalized text and its exact key, MinHash signatures over word
(or, for CJK, character) n-grams, LSH band keys, candidate confirmation, and the clusters that decide which
copy of a document survives (the smallest id, whatever the runner, bundles or workers).

Hashing is numpy-vectorized: a document's words are hashed all at once (a polynomial hash modulo 2**64 of
each word's bytes, from prefix sums), n-grams combine n word hashes, and the B*R MinHash permutations are one
multiply-add per (shingle chunk x permutation) matrix. All constants are fixed: no global RNG.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata

import numpy as np

from maskstream.errors import UserError
from maskstream.loader.order import mix64
from maskstream.pipeline.readers import DUPLICATE, NEAR_DUPLICATE

DEDUP_MODES = ("none", "exact", "minhash")      # minhash includes exact

CHUNK = 4096                  # shingles per (chunk x permutation) matrix: 4096 x 112 x 8 B = 3.7 MB at most
MAX_COMPARE = 32              # earlier members of a band bucket a document is compared with, at most

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_P = 0x100000001B3            # the polynomial hash's base (FNV's prime; odd, so invertible modulo 2**64)
_P_INV = pow(_P, -1, 1 << 64)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DedupConfig:
    """Which duplicates to drop: none, exact (normalized text), or minhash (exact, then near-duplicates).

    Defaults as datatrove's MinHash (word 5-grams, 14 bands x 8 rows: ~50% of pairs at Jaccard 0.72 become
    candidates); candidates are confirmed at estimated Jaccard >= threshold (NeMo Curator confirms at 0.8)."""
    mode: str = "none"
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    threshold: float = 0.7

    def __post_init__(self):
        checks = (("mode", self.mode in DEDUP_MODES, "|".join(DEDUP_MODES), "Pick one with --dedup."),
                  ("ngram", 1 <= self.ngram <= 32, "1..32", "Pass --minhash-ngram N, e.g. 5."),
                  ("bands", 1 <= self.bands <= 256, "1..256", "Pass --minhash-bands B, e.g. 14."),
                  ("rows", 1 <= self.rows <= 64, "1..64", "Pass --minhash-rows R, e.g. 8."),
                  ("threshold", 0.0 < self.threshold <= 1.0, "0 < t <= 1", "Pass --minhash-threshold T, e.g. 0.7."))
        for name, ok, allowed, fix in checks:
            if not ok:
                raise UserError(f"dedup {name}={getattr(self, name)!r} is not valid; allowed: {allowed}. {fix}")


def normalize(text: str) -> str:
    """Unicode NFC, case folded, whitespace runs folded to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def exact_key(text: str) -> bytes:
    """16 bytes of BLAKE2b of the normalized text: equal for copies that differ in case or spacing only."""
    return document_keys(text, DedupConfig(), None)[0]


def is_cjk(text: str, sample: int = 4000) -> bool:
    """Mostly Chinese, Japanese or Korean script (no spaces between words): shingles of characters, not words."""
    head = text[:sample]
    letters = len(head) - head.count(" ")
    return letters > 0 and len(_CJK.findall(head)) > 0.3 * letters


_powers = {"p": np.ones(1, np.uint64), "inv": np.ones(1, np.uint64)}


def _powers_up_to(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(P**k, P**-k) mod 2**64 for k < n, grown by doubling and kept (a pure function of n)."""
    have = len(_powers["p"])
    if have < n:
        size = max(n, 2 * have)
        with np.errstate(over="ignore"):
            _powers["p"] = np.multiply.accumulate(np.r_[np.uint64(1), np.full(size - 1, _P, np.uint64)])
            _powers["inv"] = np.multiply.accumulate(np.r_[np.uint64(1), np.full(size - 1, _P_INV, np.uint64)])
    return _powers["p"][:n], _powers["inv"][:n]


def _alnum_table() -> np.ndarray:
    """(65536,) bool: letters and digits of the Basic Multilingual Plane (built once per process, ~20 ms)."""
    if "alnum" not in _powers:
        _powers["alnum"] = np.array([chr(c).isalnum() for c in range(1 << 16)], bool)
    return _powers["alnum"]


def token_hashes(norm: str) -> np.ndarray:
    """(T,) uint64: one hash per word of normalized text (runs of letters and digits; the rest separates), or
    per letter for CJK text. Vectorized over code points: no Python loop over words."""
    cp = np.frombuffer(norm.encode("utf-32-le"), "<u4")
    keep = np.flatnonzero(_alnum_table()[np.minimum(cp, 0xFFFF)] | (cp > 0xFFFF))   # astral: letters too
    chars = cp[keep].astype(np.uint64)
    if is_cjk(norm) or len(chars) == 0:
        return mix64(chars)
    starts = np.flatnonzero(np.r_[True, np.diff(keep) != 1])      # a gap in the positions starts a word
    p, inv = _powers_up_to(len(chars))
    with np.errstate(over="ignore"):
        sums = np.add.reduceat(chars * p, starts)                 # sum of char * P**position over each word
        return mix64(sums * inv[starts])                          # shifted to start at P**0: position-free


def shingle_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """(S,) uint64: one hash per run of n consecutive tokens (one for a document shorter than n)."""
    if len(tokens) == 0:
        return tokens
    n = min(n, len(tokens))
    count = len(tokens) - n + 1
    h = np.zeros(count, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * np.uint64(_P) + tokens[j:j + count]
    return mix64(h)


@dataclasses.dataclass(frozen=True)
class Permutations:
    """The B*R hash functions h(x) = (a*x + b mod 2**64) >> 32, a odd: fixed, from a fixed-seed generator."""
    a: np.ndarray
    b: np.ndarray

    @classmethod
    def of(cls, count: int) -> "Permutations":
        rng = np.random.Generator(np.random.PCG64(0x6D696E68))    # fixed: signatures are comparable across runs
        a = rng.integers(0, 1 << 63, count, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        return cls(a, rng.integers(0, 1 << 63, count, dtype=np.uint64))


def signature(shingles: np.ndarray, perms: Permutations) -> np.ndarray:
    """(B*R,) uint32: the minimum of each hash function over the shingles (all ones for none)."""
    low = np.full(len(perms.a), np.iinfo(np.uint64).max, np.uint64)
    buf = np.empty((min(CHUNK, len(shingles)), len(perms.a)), np.uint64)
    with np.errstate(over="ignore"):
        for i in range(0, len(shingles), CHUNK):
            x = shingles[i:i + CHUNK, None]
            values = buf[:len(x)]
            np.multiply(x, perms.a, out=values)                 # (chunk, B*R), in place: no temporaries
            np.add(values, perms.b, out=values)
            np.minimum(low, values.min(axis=0), out=low)
    return (low >> np.uint64(32)).astype(np.uint32)   # NOTE: >> 32 keeps order, so it is taken after the min


def document_signature(text: str, config: DedupConfig, perms: Permutations) -> np.ndarray | None:
    """A document's MinHash signature; None when it has no word (exact dedup still applies)."""
    return _signature_of_normalized(normalize(text), config, perms)


def document_keys(text: str, config: DedupConfig, perms: Permutations | None) -> tuple[bytes, np.ndarray | None]:
    """(exact key, MinHash signature or None) from one normalization; no signature without perms (exact mode)."""
    norm = normalize(text)
    key = hashlib.blake2b(norm.encode(), digest_size=16).digest()
    return key, (_signature_of_normalized(norm, config, perms) if perms is not None else None)


def _signature_of_normalized(norm: str, config: DedupConfig, perms: Permutations) -> np.ndarray | None:
    shingles = shingle_hashes(token_hashes(norm), config.ngram)
    return signature(shingles, perms) if len(shingles) else None


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One key per band: its number and its R values; documents sharing one are candidates."""
    return [bytes([band]) + sig[band * rows:(band + 1) * rows].tobytes() for band in range(bands)]


def similarity(a, b) -> float:
    """Estimated Jaccard similarity of two signatures (arrays or their bytes): the fraction of equal values."""
    if isinstance(a, bytes):
        a, b = np.frombuffer(a, np.uint32), np.frombuffer(b, np.uint32)
    return float(np.mean(a == b))


def bucket_pairs(members: list, threshold: float) -> list[tuple]:
    """Members of one band bucket, (id, exact key, signature) -> confirmed (smaller id, larger id) pairs.

    Members with the same exact key are one text (exact dedup joins them); of each, the smallest id takes part.
    A member is compared with earlier ones (at most MAX_COMPARE) until one confirms."""
    seen, reps = set(), []
    for m in sorted(members, key=lambda m: m[0]):
        if m[1] not in seen:
            seen.add(m[1])
            reps.append(m)
    pairs = []
    for i, (doc, _, sig) in enumerate(reps):
        for other, _, other_sig in reps[max(0, i - MAX_COMPARE):i]:
            if similarity(sig, other_sig) >= threshold:
                pairs.append((other, doc))
                break
    return pairs


def exact_pairs(members: list) -> list[tuple]:
    """Ids of one exact key -> (smallest id, other id) pairs."""
    members = sorted(members)
    return [(members[0], m) for m in members[1:]]


def drops(pairs, keys: dict) -> dict:
    """Confirmed pairs -> {dropped id: (reason, kept id)}: each connected cluster keeps its smallest id.

    keys: id -> exact key of every id in a pair; a dropped copy whose normalized text equals the kept one's is
    a DUPLICATE, else a NEAR_DUPLICATE."""
    parent: dict = {}

    def root(x):
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x
    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    out = {}
    for x in sorted(parent):
        kept = root(x)
        if kept != x:
            out[x] = (DUPLICATE if keys[x] == keys[kept] else NEAR_DUPLICATE, kept)
    return out
