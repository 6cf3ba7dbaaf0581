"""Encoder: a tokenizer plus the two shortcuts that make the job's tokenizing cheaper, with the very same ids.

1. Word starts without offsets: for WordPiece models a (V,) table says which ids begin a word (continuation
   pieces carry "##", BertPreTokenizer makes each punctuation mark a word), so encode_batch_fast (no offsets,
   no word ids) can be used; other models take encode_batch and its word ids.
2. ASCII documents skip the normalizer. A normalizer that acts on ASCII one character at a time (BertNormalizer,
   NFC/NFD/NFKC/NFKD, Lowercase, StripAccents, or a Sequence of them) is, on ASCII text, a 128-entry table:
   `bytes.translate` applies it at memory speed, and a copy of the tokenizer without a normalizer encodes
   the result. On SOTU with BERT's tokenizer the normalizer is ~40 % of encode time (clean_text, lowercase
   and NFD, each tracking alignments per byte). The table is read off the tokenizer's own normalizer, char by
   char, and checked on a probe of every ASCII character in context; documents holding an added token's text
   (before or after normalizing: "[MASK]" in raw text is a special token, "[mask]" is not) take the full path.
   tests/pipeline/test_encoder.py checks ids and word starts equal on whole corpora.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PER_CHAR_ON_ASCII = {"BertNormalizer", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents"}


def word_start_table(tok, spec: dict | None = None) -> np.ndarray | None:
    """(V,) bool: True for ids that begin a word, for WordPiece models; None for other models.
    spec: the tokenizer's JSON, parsed (read off tok when not given)."""
    model = (spec or json.loads(tok.to_str())).get("model", {})
    prefix = model.get("continuing_subword_prefix")
    if model.get("type") != "WordPiece" or not prefix:
        return None
    table = np.ones(tok.get_vocab_size(with_added_tokens=True), dtype=bool)
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        table[i] = not token.startswith(prefix)
    for i in tok.get_added_tokens_decoder():
        table[i] = True
    return table


def _per_char_on_ascii(spec: dict | None) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_per_char_on_ascii(s) for s in spec.get("normalizers", []))
    return spec.get("type") in PER_CHAR_ON_ASCII


def _probe() -> str:
    """Every ASCII character next to letters, digits, spaces, punctuation and each other."""
    chars = [chr(c) for c in range(128)]
    return "".join(f"A{c}b{c}{c} 7{c}." for c in chars) + "".join(chars) + "".join(reversed(chars))


class AsciiPath:
    """The normalizer as a byte table, and the tokenizer without it; build() returns None when not exact."""

    def __init__(self, plain, table: bytes, delete: bytes, added: tuple[str, ...]):
        self.plain, self.table, self.delete, self.added = plain, table, delete, added

    @classmethod
    def build(cls, tok, text: str | None = None) -> "AsciiPath | None":
        """text: the tokenizer's JSON (read off tok when not given)."""
        text = text or tok.to_str()
        if not _per_char_on_ascii(json.loads(text).get("normalizer")):
            return None
        table, delete = bytearray(range(256)), bytearray()
        if tok.normalizer is not None:
            for c in range(128):
                out = tok.normalizer.normalize_str(chr(c))
                if out == "":
                    delete.append(c)
                elif len(out) == 1 and out.isascii():
                    table[c] = ord(out)
                else:
                    return None
        from tokenizers import Tokenizer
        plain = Tokenizer.from_str(text)
        plain.normalizer = None
        added = tuple(t.content for t in tok.get_added_tokens_decoder().values())
        path = cls(plain, bytes(table), bytes(delete), added)
        probe = _probe()
        want = tok.normalizer.normalize_str(probe) if tok.normalizer is not None else probe
        return path if path.normalize(probe) == want else None

    def normalize(self, text: str) -> str:
        """text (ASCII) as the tokenizer's normalizer would give it."""
        return text.encode("ascii").translate(self.table, self.delete).decode("ascii")

    def take(self, text: str) -> str | None:
        """The normalized text when this path gives the full path's ids for it, else None."""
        if not text.isascii() or any(a in text for a in self.added):
            return None
        norm = self.normalize(text)
        return None if any(a in norm for a in self.added) else norm


class Encoder:
    """tok.encode_batch for the pipeline: texts -> [(ids uint32, word starts bool)], shortcuts taken where exact."""

    def __init__(self, tok, *, ascii_path: bool = True):
        self.tok = tok
        text = tok.to_str()
        self.table = word_start_table(tok, json.loads(text))
        self.ascii = AsciiPath.build(tok, text) if ascii_path else None
        self.side: ThreadPoolExecutor | None = None

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.ascii is None:
            return self._encode(self.tok, texts)
        fast, full = [], []                     # (index, text) for each path
        for i, t in enumerate(texts):
            norm = self.ascii.take(t)
            (full if norm is None else fast).append((i, t if norm is None else norm))
        out: list = [None] * len(texts)

        def run(tok, part):
            for (i, _), piece in zip(part, self._encode(tok, [t for _, t in part])):
                out[i] = piece
        # NOTE: both calls at once (the tokenizer releases the GIL; they share its thread pool), so the few
        # full-path documents do not leave cores idle at the end of a batch
        side = self._side().submit(run, self.tok, full) if fast and full else None
        run(self.ascii.plain, fast)
        if side is None:
            run(self.tok, full)
        else:
            side.result()
        return out

    def _side(self) -> ThreadPoolExecutor:
        if self.side is None:
            self.side = ThreadPoolExecutor(1, thread_name_prefix="encode-full")
        return self.side

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
