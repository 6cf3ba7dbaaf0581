"""Tokenized documents to sequences: the record logic of Tokenize, Pack and AssignShards, without Beam.

A pack group (consecutive documents of one file) is tokenized in one encode call (pipeline/encoder.py gives ids
and word starts). Packing (a dict keyed by mode) cuts the group's tokens into sequences of exactly
L tokens wrapped in the tokenizer's own prefix/suffix ([CLS] .. [SEP], <s> .. </s>); the last one of a group
(full) or of a document (doc) is padded: a counted tail, never dropped. Where a document starts inside a
sequence is kept (SeqBatch.doc_starts): a document is its tokens and the separator after it; a row's prefix and
suffix join the documents they touch, so a start at a row's first body token is the row's own start and is not
recorded (doc packing never records one). Every sequence gets a stable uid, a
64-bit keyed hash of (config hash, source, position, sequence index); its shard and its place in the shard
come from further hashes of the uid, so nothing depends on workers, bundles or runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple

import numpy as np

from maskstream.loader.order import mix64
from maskstream.pipeline.readers import NO_TOKENS, Doc, Reject


class TokDoc(NamedTuple):
    source: str
    position: int
    ids: np.ndarray          # (n,) uint32
    word_starts: np.ndarray  # (n,) bool


@dataclasses.dataclass
class SeqBatch:
    """Sequences of one pack group (or one shard's share of it)."""
    uids: np.ndarray         # (B,) uint64
    tokens: np.ndarray       # (B, L) uint16|uint32, pad after length
    word_starts: np.ndarray  # (B, L) bool
    lengths: np.ndarray      # (B,) int32
    doc_starts: np.ndarray   # (B, L) bool, True where a document starts inside a row (never at position 0)
    unit_starts: np.ndarray | None = None  # (B, L) bool, PMI masking units (pipeline/pmi.py); None without them

    def __len__(self):
        return len(self.uids)

    def take(self, idx) -> "SeqBatch":
        return SeqBatch(*(None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                          for f in dataclasses.fields(self)))

    @staticmethod
    def concat(batches: list["SeqBatch"]) -> "SeqBatch":
        return SeqBatch(*(None if getattr(batches[0], f.name) is None else
                          np.concatenate([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(SeqBatch)))


def tokenize_group(encoder, docs: list[Doc]) -> tuple[list[TokDoc], list[Reject]]:
    """Tokenize a group's documents in one batch; parts of an oversized document are joined back."""
    return tokenize_groups(encoder, [docs])[0]


def tokenize_groups(encoder, groups: list[list[Doc]]) -> list[tuple[list[TokDoc], list[Reject]]]:
    """Tokenize several groups in ONE encode call (so the Rust thread pool gets many documents at once);
    returns each group's (tokenized documents, rejects), as tokenize_group would. encoder: pipeline.encoder.Encoder."""
    groups = [sorted(docs, key=lambda d: (d.position, d.part)) for docs in groups]
    pieces = encoder.encode([d.text for docs in groups for d in docs])
    results, start = [], 0
    for docs in groups:
        results.append(_merge_parts(docs, pieces[start:start + len(docs)]))
        start += len(docs)
    return results


def _merge_parts(docs: list[Doc], pieces) -> tuple[list[TokDoc], list[Reject]]:
    """One group's (ids, word starts) per document part -> TokDocs, parts joined; no tokens -> Reject."""
    merged: dict[tuple[str, int], list] = {}
    for doc, (ids, starts) in zip(docs, pieces, strict=False):
        if len(starts):
            starts[0] = True    # a part cut at whitespace begins with a word
        merged.setdefault((doc.source, doc.position), []).append((ids, starts))
    out, rejects = [], []
    for (source, position), parts in merged.items():
        ids = np.concatenate([p[0] for p in parts])
        if len(ids) == 0:
            rejects.append(Reject(source, position, NO_TOKENS, "text normalizes to no tokens"))
        else:
            out.append(TokDoc(source, position, ids, np.concatenate([p[1] for p in parts])))
    return out, rejects


def _chunks(ids: np.ndarray, ws: np.ndarray, *, seq_len: int, prefix, suffix, pad_id: int, dtype):
    """Cut one token stream into (n, L) sequences of [prefix] chunk [suffix]; the last one padded.
    (_doc_starts cuts the stream's document starts the same way.)"""
    body = seq_len - len(prefix) - len(suffix)
    n = -(-len(ids) // body)
    tokens = np.full((n, seq_len), pad_id, dtype=dtype)
    starts = np.zeros((n, seq_len), dtype=bool)
    lengths = np.full(n, seq_len, dtype=np.int32)
    padded = np.zeros(n * body, dtype=ids.dtype)
    padded[:len(ids)] = ids
    wpad = np.zeros(n * body, dtype=bool)
    wpad[:len(ws)] = ws
    a, b = len(prefix), len(prefix) + body
    tokens[:, :a] = prefix
    tokens[:, a:b] = padded.reshape(n, body)
    starts[:, :a] = True                       # each special token is a word of its own
    starts[:, a:b] = wpad.reshape(n, body)
    tokens[:, b:] = suffix
    starts[:, b:] = True
    tail = len(ids) - (n - 1) * body
    if tail < body:                            # move the suffix up behind the last real token, pad the rest
        end = a + tail
        tokens[-1, end:] = pad_id
        starts[-1, end:] = False
        tokens[-1, end:end + len(suffix)] = suffix
        starts[-1, end:end + len(suffix)] = True
        lengths[-1] = end + len(suffix)
    return tokens, starts, lengths


def _doc_starts(firsts: np.ndarray, *, n: int, seq_len: int, prefix_len: int, suffix_len: int) -> np.ndarray:
    """(n, L) bool: the stream's document-first flags cut into rows as _chunks cuts its tokens, less each row's
    first body token (the row's prefix joins that document: the row starts with it)."""
    body = seq_len - prefix_len - suffix_len
    padded = np.zeros(n * body, dtype=bool)
    padded[:len(firsts)] = firsts
    out = np.zeros((n, seq_len), dtype=bool)
    out[:, prefix_len:prefix_len + body] = padded.reshape(n, body)
    out[:, :prefix_len + 1] = False
    return out


def _pack_full(docs: list[TokDoc], *, sep_id: int):
    """One stream per group: documents joined by the separator (RoBERTa full-sentences)."""
    ids, ws, firsts = [], [], []
    for i, d in enumerate(docs):
        if i:
            ids.append(np.array([sep_id], dtype=np.uint32))  # the separator ends the document before it
            ws.append(np.ones(1, dtype=bool))
            firsts.append(np.zeros(1, dtype=bool))
        ids.append(d.ids)
        ws.append(d.word_starts)
        firsts.append(np.arange(len(d.ids)) == 0)
    return [(docs[0].position, np.concatenate(ids), np.concatenate(ws), np.concatenate(firsts))]


def _pack_doc(docs: list[TokDoc], *, sep_id: int):
    """One stream per document: a sequence never crosses a document."""
    return [(d.position, d.ids, d.word_starts, np.arange(len(d.ids)) == 0) for d in docs]


# packing mode -> group's documents -> [(uid position, ids, word starts, document firsts)], one stream each
PACKERS = {"full": _pack_full, "doc": _pack_doc}


def make_uids(key: bytes, source: str, position: int, count: int) -> np.ndarray:
    """(count,) uint64: keyed 64-bit hashes of (source, position, sequence index)."""
    stem = f"{source}\0{position}\0".encode()
    return np.array([int.from_bytes(hashlib.blake2b(stem + str(i).encode(), digest_size=8, key=key).digest(),
                                    "little") for i in range(count)], dtype=np.uint64)


def pack_group(docs: list[TokDoc], *, packing: str, seq_len: int, info, key: bytes, dtype,
               units=None) -> tuple[SeqBatch, dict]:
    """All sequences of a group's tokenized documents, and the group's counts; with units (a pipeline.pmi
    Matcher) also their unit starts, cut into rows exactly as the word starts are."""
    batches = []
    tails = 0
    streams = PACKERS[packing](docs, sep_id=info.sep_id)
    unit_streams = [None] * len(streams) if units is None else PACKERS[packing](
        [d._replace(word_starts=units.unit_starts(d.ids, d.word_starts)) for d in docs], sep_id=info.sep_id)
    for (position, ids, ws, firsts), unit_stream in zip(streams, unit_streams, strict=True):
        tokens, starts, lengths = _chunks(ids, ws, seq_len=seq_len, prefix=info.prefix, suffix=info.suffix,
                                          pad_id=info.pad_id, dtype=dtype)
        unit_starts = None if unit_stream is None else _chunks(
            ids, unit_stream[2], seq_len=seq_len, prefix=info.prefix, suffix=info.suffix, pad_id=info.pad_id,
            dtype=dtype)[1]
        tails += int(lengths[-1] < seq_len)
        uids = make_uids(key, docs[0].source, position, len(lengths))
        doc_starts = _doc_starts(firsts, n=len(lengths), seq_len=seq_len, prefix_len=len(info.prefix),
                                 suffix_len=len(info.suffix))
        batches.append(SeqBatch(uids, tokens, starts, lengths, doc_starts, unit_starts))
    batch = SeqBatch.concat(batches)
    stats = {"documents_written": len(docs), "sequences": len(batch), "tail_sequences": tails,
             "tokens": int(batch.lengths.sum()),
             "content_tokens": int(sum(len(d.ids) for d in docs)),
             "pad_tokens": int(len(batch) * seq_len - batch.lengths.sum())}
    return batch, stats


def _mix(x: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 finalizer (loader.order.mix64, the one definition) of x ^ salt, (n,) uint64 -> (n,) uint64."""
    return mix64(np.asarray(x, dtype=np.uint64) ^ np.uint64(salt))


SHARD_SALT = 0x5EED_0F_5A4D
ORDER_SALT = 0x0D0E_4_5EED


def shard_of(uids: np.ndarray, num_shards: int) -> np.ndarray:
    return (_mix(uids, SHARD_SALT) % np.uint64(num_shards)).astype(np.int64)


def shard_order(uids: np.ndarray) -> np.ndarray:
    """Indices putting sequences in their in-shard order: by a hash of the uid, ties by uid."""
    return np.lexsort((uids, _mix(uids, ORDER_SALT)))


def split_by_shard(batch: SeqBatch, num_shards: int) -> list[tuple[int, SeqBatch]]:
    shards = shard_of(batch.uids, num_shards)
    return [(int(s), batch.take(shards == s)) for s in np.unique(shards)]
