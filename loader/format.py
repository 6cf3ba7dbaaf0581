"""The shard format (DESIGN contract 1): the one versioned contract between the Beam writer and the loader.

A dataset is a folder (or URL prefix) with `index.json` and tar shards `shard-000000.tar` ... Each tar record
(members sharing a `__key__`) is a *block* of B sequences stored as `.npy` arrays:

    tokens.npy          (B, L) uint16 (uint32 when the vocabulary does not fit)
    lengths.npy         (B,)   uint16|uint32  real tokens per row, the rest padding; absent when all rows are full
    word_starts.npy     (B, ceil(L/8)) uint8  bit-packed word-start flags (from the tokenizer's word ids)
    uids.npy            (B,)   uint64         stable sequence ids
    static_selected.npy (B, K, ceil(L/8)) uint8  [static mode] bit-packed positions chosen in copy k
    static_inputs.npy   (S,)   token dtype    [static mode] input ids at the chosen positions, in C order

Tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0644, USTAR, no PAX header), so the same input
and config give byte-identical shards. `index.json` is written last; a dataset without it is incomplete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile

import numpy as np

from maskstream.errors import UserError
from maskstream.loader.atomic import atomic_write, commit

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
PARTIAL_SUFFIX = ".partial"  # temporary names of shards being written; renamed when complete
MAX_MEMBER_BYTES = 64 << 20  # a reader refuses any member larger than this
MEMBERS = ("tokens.npy", "lengths.npy", "word_starts.npy", "uids.npy", "static_selected.npy",
           "static_inputs.npy")
_SHARD_NAME = re.compile(r"^shard-[0-9]{6}\.tar$")
_INDEX_KEYS = ("format_version", "shards", "counts", "seq_len", "packing", "tokenizer", "masking", "config",
               "inputs")


class FormatError(UserError):
    """A shard or index that does not follow the format: refused, never read around."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def check_shard_name(name: str) -> str:
    """A shard name from index.json must be a plain `shard-NNNNNN.tar`: no `pipe:`, paths, `..` or braces."""
    if not isinstance(name, str) or not _SHARD_NAME.match(name):
        raise FormatError(f"index.json names a shard {name!r}; only plain names like 'shard-000000.tar' are "
                          "allowed (no 'pipe:', no paths, no '..', no braces or '${}')")
    return name


@dataclasses.dataclass
class Block:
    """A record: B sequences of length L, with their word starts, uids and (static mode) K stored masks."""
    tokens: np.ndarray                           # (B, L) uint16|uint32
    lengths: np.ndarray                          # (B,) int32
    word_starts: np.ndarray                      # (B, L) bool
    uids: np.ndarray                             # (B,) uint64
    static_selected: np.ndarray | None = None    # (B, K, L) bool
    static_inputs: np.ndarray | None = None      # (B, K, L) int64

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


# ---- encode / decode one record ---------------------------------------------------------------------------

def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_block(block: Block, *, vocab_size: int) -> dict[str, bytes]:
    """Member suffix -> bytes for one record."""
    B, L = block.tokens.shape
    dtype = token_dtype(vocab_size)
    if block.tokens.size and int(block.tokens.max()) >= vocab_size:
        raise FormatError(f"token id {int(block.tokens.max())} >= vocab size {vocab_size}")
    lengths_dtype = np.uint16 if L < 1 << 16 else np.uint32
    members = {"tokens.npy": _npy(block.tokens.astype(dtype, copy=False))}
    if (block.lengths != L).any():  # full packing pads only a group's tail: most records need no lengths
        members["lengths.npy"] = _npy(block.lengths.astype(lengths_dtype))
    members["word_starts.npy"] = _npy(np.packbits(block.word_starts.astype(bool), axis=-1))
    members["uids.npy"] = _npy(block.uids.astype(np.uint64))
    if block.static_selected is not None:
        selected = block.static_selected.astype(bool)
        members["static_selected.npy"] = _npy(np.packbits(selected, axis=-1))
        members["static_inputs.npy"] = _npy(block.static_inputs[selected].astype(dtype))
    return members


def _load(members: dict[str, bytes], name: str, max_bytes: int) -> np.ndarray:
    data = members.get(name)
    if data is None:
        raise FormatError(f"record lacks member {name!r}")
    if len(data) > max_bytes:
        raise FormatError(f"member {name!r} is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # pickled object arrays and malformed headers land here
        raise FormatError(f"member {name!r} is not a plain .npy array: {e}") from e


def _expect(array: np.ndarray, name: str, dtypes: tuple, shape: tuple) -> np.ndarray:
    if array.dtype not in [np.dtype(d) for d in dtypes]:
        raise FormatError(f"member {name!r} has dtype {array.dtype}, expected one of {dtypes}")
    if array.shape != shape:
        raise FormatError(f"member {name!r} has shape {array.shape}, expected {shape}")
    return array


def decode_block(members: dict[str, bytes], *, seq_len: int, vocab_size: int, static_copies: int = 0,
                 max_member_bytes: int = MAX_MEMBER_BYTES) -> Block:
    """Check and decode one record. Unknown members (a `.pyd`, `.pkl` or `.pth` among them) are refused
    unread: nothing from a shard is ever unpickled."""
    unknown = sorted(set(members) - set(MEMBERS))
    if unknown:
        raise FormatError(f"record has members {unknown} that are not part of format v{FORMAT_VERSION} "
                          f"(allowed: {list(MEMBERS)}); refusing to decode it")
    tokens = _load(members, "tokens.npy", max_member_bytes)
    if tokens.ndim != 2 or tokens.shape[1] != seq_len:
        raise FormatError(f"tokens have shape {tokens.shape}, expected (B, {seq_len})")
    B, L = tokens.shape
    _expect(tokens, "tokens.npy", (token_dtype(vocab_size),), (B, L))
    if B and int(tokens.max()) >= vocab_size:
        raise FormatError(f"token id {int(tokens.max())} >= vocab size {vocab_size}")
    if "lengths.npy" in members:
        lengths = _expect(_load(members, "lengths.npy", max_member_bytes), "lengths.npy",
                          (np.uint16, np.uint32), (B,)).astype(np.int32)
    else:  # absent: every row is full
        lengths = np.full(B, L, dtype=np.int32)
    if B and (lengths.max() > L or lengths.min() < 1):
        raise FormatError(f"lengths outside [1, {L}]")
    packed = _expect(_load(members, "word_starts.npy", max_member_bytes), "word_starts.npy",
                     (np.uint8,), (B, (L + 7) // 8))
    word_starts = np.unpackbits(packed, axis=-1, count=L).astype(bool)
    uids = _expect(_load(members, "uids.npy", max_member_bytes), "uids.npy", (np.uint64,), (B,))
    block = Block(tokens=tokens, lengths=lengths, word_starts=word_starts, uids=uids)
    if static_copies:
        sel = _expect(_load(members, "static_selected.npy", max_member_bytes), "static_selected.npy",
                      (np.uint8,), (B, static_copies, (L + 7) // 8))
        selected = np.unpackbits(sel, axis=-1, count=L).astype(bool)
        values = _load(members, "static_inputs.npy", max_member_bytes)
        _expect(values, "static_inputs.npy", (token_dtype(vocab_size),), (int(selected.sum()),))
        inputs = np.broadcast_to(tokens[:, None, :], selected.shape).astype(np.int64)
        inputs[selected] = values
        block.static_selected, block.static_inputs = selected, inputs
    return block


# ---- writing shards ---------------------------------------------------------------------------------------

class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `raw`."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def writable(self):
        return True

    def tell(self):
        return self.size

    def write(self, b):
        b = bytes(b)
        self.raw.write(b)
        self.sha.update(b)
        self.size += len(b)
        return len(b)


class ShardWriter:
    """Writes one shard as a deterministic tar, record by record, and returns its index.json entry.

    `ShardWriter.create(directory, i)` writes a local file under a temporary name and renames it on close;
    `ShardWriter(fileobj, name)` writes into any binary stream (e.g. a Beam filesystem's) and leaves naming
    to the caller.
    """

    def __init__(self, fileobj, name: str, *, vocab_size: int):
        self.name, self.vocab_size = check_shard_name(name), vocab_size
        self._out = _HashingWriter(fileobj)
        self._records: list[list[int]] = []
        self._tokens = 0
        self._final_path = self._temp_path = None

    @classmethod
    def create(cls, directory: str, index: int, *, vocab_size: int) -> "ShardWriter":
        name = shard_name(index)
        temp = os.path.join(directory, name + PARTIAL_SUFFIX)
        writer = cls(open(temp, "wb"), name, vocab_size=vocab_size)
        writer._temp_path, writer._final_path = temp, os.path.join(directory, name)
        return writer

    def add(self, block: Block) -> None:
        if len(block) == 0:
            raise FormatError("refusing to write an empty record")
        key = f"{len(self._records):06d}"
        self._records.append([self._out.size, len(block)])  # the record's first header starts here
        for suffix, data in encode_block(block, vocab_size=self.vocab_size).items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            # NOTE: the tar is written by hand with tarfile's public TarInfo.tobuf(): a USTAR member is a
            # 512-byte header, the data, then zero padding to the next 512-byte block.
            self._out.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
            self._out.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        self._tokens += int(block.lengths.sum())

    def close(self) -> dict:
        """Finish the tar, rename it into place (local mode) and return the shard's index entry."""
        # NOTE: the end-of-archive marker is two zero blocks; no padding to tarfile's 10 KiB record size,
        # which would be dead bytes in every shard.
        self._out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self._out.raw.flush()
        if self._final_path:
            commit(self._out.raw, self._temp_path, self._final_path)
        return {"name": self.name, "bytes": self._out.size, "sha256": self._out.sha.hexdigest(),
                "sequences": sum(n for _, n in self._records), "tokens": self._tokens,
                "records": self._records}


def remove_partials(directory: str) -> list[str]:
    """Delete shards left half-written by a crashed run; returns their names."""
    gone = [n for n in sorted(os.listdir(directory)) if n.endswith(PARTIAL_SUFFIX)]
    for n in gone:
        os.remove(os.path.join(directory, n))
    return gone


# ---- index.json -------------------------------------------------------------------------------------------

def make_index(*, entries: list[dict], seq_len: int, packing: str, tokenizer: dict, masking_config: dict,
               masking_mode: str = "dynamic", static_copies: int = 0, masking_seed: int = 0,
               counts: dict | None = None, config: dict | None = None, inputs: list | None = None,
               **extra) -> dict:
    """The one builder of an index.json dict (writer, benchmarks and test fixtures all call it).

    `entries` are ShardWriter.close() results (sorted by name here); `counts` defaults to the sequences and
    tokens the entries hold, and what is given overrides those.
    """
    entries = sorted(entries, key=lambda e: e["name"])
    derived = {"sequences": sum(e["sequences"] for e in entries), "tokens": sum(e["tokens"] for e in entries)}
    return {
        "format_version": FORMAT_VERSION, "shards": entries, "counts": {**derived, **(counts or {})},
        "seq_len": seq_len, "packing": packing, "tokenizer": tokenizer,
        "masking": {"mode": masking_mode, "static_copies": static_copies, "seed": masking_seed,
                    "config": masking_config},
        "config": config or {}, "inputs": list(inputs or []), **extra,
    }


def dump_index(index: dict) -> bytes:
    """Canonical bytes of index.json (sorted keys, so a rerun gives the same bytes)."""
    return (json.dumps(index, indent=1, sort_keys=True) + "\n").encode()


def write_index(directory: str, index: dict) -> None:
    """Write index.json atomically; call it last, after every shard is in place."""
    read_index(dump_index(index))  # never write an index we would refuse to read
    atomic_write(os.path.join(directory, INDEX_FILE), dump_index(index),
                 temp=os.path.join(directory, INDEX_FILE + PARTIAL_SUFFIX))


def read_index(data: str | bytes, *, source: str = INDEX_FILE) -> dict:
    """Parse and check an index.json; refuses unknown versions and incomplete or inconsistent manifests."""
    try:
        index = json.loads(data)
    except ValueError as e:
        raise FormatError(f"{source} is not valid JSON ({e}); the dataset is incomplete or corrupt") from e
    if not isinstance(index, dict) or "format_version" not in index:
        raise FormatError(f"{source} has no format_version; not a maskstream dataset")
    if index["format_version"] != FORMAT_VERSION:
        raise FormatError(f"{source} has format version {index['format_version']!r}; this maskstream reads "
                          f"version {FORMAT_VERSION}: rerun `maskstream preprocess` or upgrade maskstream")
    missing = [k for k in _INDEX_KEYS if k not in index]
    if missing:
        raise FormatError(f"{source} lacks {missing}; the dataset is incomplete")
    for shard in index["shards"]:
        check_shard_name(shard.get("name"))
        if sum(n for _, n in shard["records"]) != shard["sequences"]:
            raise FormatError(f"{source}: record counts of {shard['name']} do not add up to its sequences")
    total = sum(s["sequences"] for s in index["shards"])
    if total != index["counts"].get("sequences"):
        raise FormatError(f"{source}: shards hold {total} sequences but counts say "
                          f"{index['counts'].get('sequences')}")
    return index


def shard_sha256(path: str) -> str:
    """sha256 of a local file, read in 1 MiB pieces."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            sha.update(piece)
    return sha.hexdigest()
