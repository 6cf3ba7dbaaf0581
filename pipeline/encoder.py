"""Encoder: a tokenizer plus the two shortcuts that make the job's tokenizing cheaper, with the very same ids.

1. Word starts without offsets: for WordPiece models a (V,) table says which ids begin a word (continuation
   pieces carry "##", BertPreTokenizer makes each punctuation mark a word), so encode_batch_fast (no offsets,
   no word ids) can be used; other models take encode_batch and its word ids.
2. ASCII documents skip the normalizer and BertPreTokenizer. A normalizer that acts on ASCII one character at a
   time (BertNormalizer, NFC/NFD/NFKC/NFKD, Lowercase, StripAccents, or a Sequence of them) is, on ASCII text,
   a 128-entry table that `bytes.translate` applies at memory speed; BertPreTokenizer on ASCII splits at
   whitespace and isolates punctuation, which is WhitespaceSplit after a space is put either side of each
   punctuation mark (numpy). A copy of the tokenizer without the normalizer, with WhitespaceSplit, encodes the
   result. Measured on SOTU with BERT's tokenizer (2 cores): the full encode_batch_fast 1.5-1.9 s, without the
   normalizer 0.9-1.2 s, with WhitespaceSplit too 0.6-0.7 s (+0.07 s of numpy). Both rules are read off the
   tokenizer's own normalizer and pre-tokenizer, char by char, and checked on a probe of every ASCII character
   in context; documents holding an added token's text (before or after normalizing: "[MASK]" in raw text is a
   special token, "[mask]" is not) take the full path. tests/pipeline/test_encoder.py checks ids and word
   starts equal on whole corpora.
"""
from __future__ import annotations

import json
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PER_CHAR_ON_ASCII = {"BertNormalizer", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents"}
# NOTE: NFC/NFKC compose a character with the next one, so on other text only these act one char at a time
PER_CHAR = PER_CHAR_ON_ASCII - {"NFC", "NFKC"}


def word_start_table(tok) -> np.ndarray | None:
    """(V,) bool: True for ids that begin a word, for WordPiece models; None for other models."""
    prefix = getattr(tok.model, "continuing_subword_prefix", None)
    if type(tok.model).__name__ != "WordPiece" or not prefix:
        return None
    table = np.ones(tok.get_vocab_size(with_added_tokens=True), dtype=bool)
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        table[i] = not token.startswith(prefix)
    for i in tok.get_added_tokens_decoder():
        table[i] = True
    return table


def _per_char(spec: dict | None, kinds: set[str]) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_per_char(s, kinds) for s in spec.get("normalizers", []))
    return spec.get("type") in kinds


def _probe() -> str:
    """Every ASCII character next to letters, digits, spaces, punctuation, itself and each other."""
    chars = [chr(c) for c in range(128)]
    return "".join(f"A{c}b{c}{c} 7{c}.,a" for c in chars) + "".join(chars) + "".join(reversed(chars))


def _normalizer_table(tok) -> tuple[bytes, bytes] | None:
    """(translate table, deleted bytes) doing on ASCII what tok's normalizer does, read off it char by char."""
    table, delete = bytearray(range(256)), bytearray()
    for c in range(128):
        out = tok.normalizer.normalize_str(chr(c)) if tok.normalizer is not None else chr(c)
        if out == "":
            delete.append(c)
        elif len(out) == 1 and out.isascii():
            table[c] = ord(out)
        else:
            return None
    return bytes(table), bytes(delete)


def _isolated(tok) -> np.ndarray | None:
    """(256,) bool of the ASCII characters BertPreTokenizer makes words of their own (punctuation), read off it."""
    if type(tok.pre_tokenizer).__name__ != "BertPreTokenizer":
        return None
    isolate = np.zeros(256, dtype=bool)
    for c in range(33, 127):
        pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(f"a{chr(c)}b")]
        isolate[c] = pieces == ["a", chr(c), "b"]
    return isolate


def space_out(text: str, isolate: np.ndarray) -> str:
    """ASCII text with a space either side of each isolated character: " x " (numpy, no Python loop)."""
    b = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    hit = isolate[b]
    reps = 1 + 2 * hit.astype(np.int64)
    out = np.repeat(b, reps)                    # each isolated char three times ...
    at = (np.cumsum(reps) - reps)[hit]
    out[at] = out[at + 2] = ord(" ")            # ... its copies either side turned into spaces
    return out.tobytes().decode("ascii")


class AsciiPath:
    """ASCII text made ready by numpy/bytes for a stripped-down copy of the tokenizer (`plain`).
    build() returns None unless that is exact for this tokenizer, checked on a probe."""

    def __init__(self, plain, table: bytes, delete: bytes, isolate: np.ndarray | None, added: tuple[str, ...]):
        self.plain, self.table, self.delete, self.isolate, self.added = plain, table, delete, isolate, added
        self.firsts = sorted({a[0] for a in added if a})

    @classmethod
    def build(cls, tok) -> "AsciiPath | None":
        from tokenizers import Tokenizer, pre_tokenizers
        spec = json.loads(tok.normalizer.__getstate__()) if tok.normalizer is not None else None
        tables = _normalizer_table(tok) if _per_char(spec, PER_CHAR_ON_ASCII) else None
        if tables is None:
            return None
        # NOTE: plain shares tok's model (no copy). It has no added tokens: it only sees texts without their text
        isolate = _isolated(tok)
        plain = Tokenizer(tok.model)
        plain.pre_tokenizer = pre_tokenizers.WhitespaceSplit() if isolate is not None else tok.pre_tokenizer
        path = cls(plain, *tables, isolate, tuple(t.content for t in tok.get_added_tokens_decoder().values()))
        probe = _probe()
        norm = tok.normalizer.normalize_str(probe) if tok.normalizer is not None else probe
        if path.normalize(probe) != norm:
            return None
        if isolate is not None:
            words = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(norm)]
            if [w for w, _ in plain.pre_tokenizer.pre_tokenize_str(space_out(norm, isolate))] != words:
                return None
        return path

    def normalize(self, text: str) -> str:
        """text (ASCII) as the tokenizer's normalizer would give it."""
        return text.encode("ascii").translate(self.table, self.delete).decode("ascii")

    def take(self, text: str) -> str | None:
        """What `plain` must encode to give the full tokenizer's ids for text, or None when this path can't."""
        if not text.isascii() or self._holds_added(text):
            return None
        norm = self.normalize(text)
        if self._holds_added(norm):
            return None
        if self.isolate is None:
            return norm
        spaced = space_out(norm, self.isolate)
        return None if self._holds_added(spaced) else spaced

    def _holds_added(self, text: str) -> bool:
        # NOTE: first a search for each added token's first character (one memchr for BERT's "[..]"), which
        # most documents lack; the whole texts only where it is found
        return any(c in text for c in self.firsts) and any(a in text for a in self.added)


class Encoder:
    """tok.encode_batch for the pipeline: texts -> [(ids uint32, word starts bool)], shortcuts taken where exact.
    encode() may be called from several threads at once."""

    def __init__(self, tok, *, ascii_path: bool = True):
        self.tok = tok
        self.table = word_start_table(tok)
        self.ascii = AsciiPath.build(tok) if ascii_path else None
        self.unicode = UnicodePath.build(tok, self.ascii) if self.ascii is not None else None
        self.side = ThreadPoolExecutor(1, thread_name_prefix="encode-full")   # its thread starts on first use

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.ascii is None:
            return self._encode(self.tok, texts)
        fast, full = [], []                     # (index, text) for each path
        for i, t in enumerate(texts):
            norm = self.take(t)
            (full if norm is None else fast).append((i, t if norm is None else norm))
        out: list = [None] * len(texts)

        def run(tok, part):
            for (i, _), piece in zip(part, self._encode(tok, [t for _, t in part]), strict=False):
                out[i] = piece
        # NOTE: both calls at once (the tokenizer releases the GIL; they share its thread pool), so the few
        # full-path documents do not leave cores idle at the end of a batch
        side = self.side.submit(run, self.tok, full) if fast and full else None
        run(self.ascii.plain, fast)
        if side is None:
            run(self.tok, full)
        else:
            side.result()
        return out

    def take(self, text: str) -> str | None:
        """What the stripped-down tokenizer must encode for text, or None: the full tokenizer encodes it."""
        if text.isascii() or self.unicode is None:
            return self.ascii.take(text)
        return self.unicode.take(text)

    def _encode(self, tok, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        if not texts:
            return []
        if self.table is None:
            return [(np.asarray(e.ids, dtype=np.uint32), word_starts_from_ids(e.word_ids))
                    for e in tok.encode_batch(texts, add_special_tokens=False)]
        ids = [np.asarray(e.ids, dtype=np.uint32) for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
        return [(i, self.table[i]) for i in ids]


def word_starts_from_ids(word_ids: list) -> np.ndarray:
    """True where a token begins a word: its word id differs from the previous token's."""
    w = np.array([-1 if x is None else x for x in word_ids], dtype=np.int64)
    starts = np.ones(len(w), dtype=bool)
    starts[1:] = w[1:] != w[:-1]
    return starts


class UnicodePath:
    """The ASCII path's idea for any text, BertPreTokenizer only: each character's normalized form, with a space
    either side of each isolated character, is read off the tokenizer the first time the character is met and
    kept in a codepoint table; numpy assembles a document from it (UTF-32 in, UTF-32 out). A character is taken
    only when a probe of it in context gives the tokenizer's own normalized text and words; the others (and
    every document holding one) take the full path. CJK text gains most: BertNormalizer spaces each CJK
    character, which the tokenizer does with per-character alignment bookkeeping."""

    WIDTH = 6                                   # longest form kept; a longer one sends its documents the full way
    PAD = 0xFFFFFFFF                            # not a codepoint: fills each form up to the table's width

    def __init__(self, tok, ascii_path: AsciiPath):
        self.tok, self.ascii, self.lock = tok, ascii_path, threading.Lock()
        # NOTE: the tokenizer looks for these in the normalized text, the others in the raw text only
        self.normalized_added = tuple(t.content for t in tok.get_added_tokens_decoder().values() if t.normalized)
        self.index = np.full(0x110000, -1, dtype=np.int32)     # codepoint -> row, -1 not met yet
        # row 0: characters the path can't take. Each row: the spaced and the normalized form (UTF-32, padded)
        self.spaced = np.full((1, 1), self.PAD, dtype=np.uint32)
        self.normal = np.full((1, 1), self.PAD, dtype=np.uint32)

    @classmethod
    def build(cls, tok, ascii_path: AsciiPath) -> "UnicodePath | None":
        spec = json.loads(tok.normalizer.__getstate__()) if tok.normalizer is not None else None
        if ascii_path.isolate is None or not _per_char(spec, PER_CHAR):
            return None
        return cls(tok, ascii_path)

    def take(self, text: str) -> str | None:
        """What `plain` must encode to give the full tokenizer's ids for text, or None when this path can't."""
        try:
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:              # a lone surrogate
            return None
        rows = self.index[cps]
        if (rows < 0).any():
            self._learn(np.unique(cps[rows < 0]))
            rows = self.index[cps]
        if not rows.all() or self.ascii._holds_added(text):
            return None
        spaced = self._assemble(self.spaced, rows)
        if self.ascii._holds_added(spaced):
            return None
        if self.normalized_added and any(c in spaced for c in self.ascii.firsts):
            normal = self._assemble(self.normal, rows)
            if any(a in normal for a in self.normalized_added):
                return None
        return spaced

    def _assemble(self, forms: np.ndarray, rows: np.ndarray) -> str:
        out = forms[rows].ravel()
        return out[out != self.PAD].tobytes().decode("utf-32-le")

    def _learn(self, cps: np.ndarray) -> None:
        """Rows for new codepoints: their forms where a probe proves them, row 0 where not."""
        with self.lock:                          # encode() runs on several threads
            cps = cps[self.index[cps] < 0]
            forms = {int(c): self._forms(chr(c)) for c in cps}
            proven = [c for c, f in forms.items() if f is not None]
            if proven and not self._probe_holds(proven, forms):
                proven = [c for c in proven if self._probe_holds([c], forms)]
            spaced, normal = self.spaced, self.normal
            for k, table in enumerate((spaced, normal)):
                width = max([table.shape[1]] + [len(forms[c][k]) for c in proven])
                grown = np.full((len(table) + len(proven), width), self.PAD, dtype=np.uint32)
                grown[:len(table), :table.shape[1]] = table
                for r, c in enumerate(proven, start=len(table)):
                    grown[r, :len(forms[c][k])] = [ord(x) for x in forms[c][k]]
                spaced, normal = (grown, normal) if k == 0 else (spaced, grown)
            # NOTE: tables grown before the index points into them: a reader on another thread sees old or new
            base = len(self.spaced)
            self.spaced, self.normal = spaced, normal
            self.index[cps] = 0
            self.index[np.asarray(proven, dtype=np.int64)] = np.arange(base, base + len(proven), dtype=np.int32)

    def _forms(self, ch: str) -> tuple[str, str] | None:
        """(spaced, normalized) forms of one character, or None where the path must not take it."""
        norm = self.tok.normalizer.normalize_str(ch) if self.tok.normalizer is not None else ch
        # NOTE: NFD orders runs of combining marks, which is not a per-character rule: none may survive
        if any(unicodedata.combining(x) for x in norm) or (norm and unicodedata.combining(ch)):
            return None
        spaced = "".join(f" {x} " if self._isolated(x) else x for x in norm)
        return (spaced, norm) if len(spaced) <= self.WIDTH else None

    def _isolated(self, ch: str) -> bool:
        return [p for p, _ in self.tok.pre_tokenizer.pre_tokenize_str(f"a{ch}b")] == ["a", ch, "b"]

    def _probe_holds(self, cps: list[int], forms: dict) -> bool:
        """Each character in context: the tokenizer's normalized text and words equal the assembled ones."""
        chars = [chr(c) for c in cps]
        probe = "".join(f"A{c}b{c}{c} 7{c}.,a\u4e2d{c} " for c in chars)     # 中: a CJK neighbour
        known = {**{c: forms[c] for c in cps}, **{ord(x): self._forms(x) for x in "Ab 7.,a\u4e2d"}}
        if any(f is None for f in known.values()):
            return False
        norm = self.tok.normalizer.normalize_str(probe) if self.tok.normalizer is not None else probe
        if "".join(known[ord(x)][1] for x in probe) != norm:
            return False
        spaced = "".join(known[ord(x)][0] for x in probe)
        words = [w for w, _ in self.tok.pre_tokenizer.pre_tokenize_str(norm)]
        return [w for w, _ in self.ascii.plain.pre_tokenizer.pre_tokenize_str(spaced)] == words
