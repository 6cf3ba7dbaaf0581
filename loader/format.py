"""The shard format (DESIGN contract 1): the one versioned contract between the Beam writer and the loader.

A dataset is a folder (or URL prefix) with `index.json` and tar shards `shard-000000.tar` ... Each tar record
(members sharing a `__key__`) is a *block* of B sequences stored as `.npy` arrays:

    tokens.npy          (B, L) uint16 (uint32 when the vocabulary does not fit)
    lengths.npy         (B,)   uint16|uint32  real tokens per row, the rest padding; absent when all rows are full
    word_starts.npy     (B, ceil(L/8)) uint8  bit-packed word-start flags (from the tokenizer's word ids)
    uids.npy            (B,)   uint64         stable sequence ids
    doc_starts.npy      (D,)   uint32         [v2] flat positions row * L + p where a document starts inside a
                                              row (p >= 1); absent when no document starts inside any row
    unit_starts.npy     (B, ceil(L/8)) uint8  [selection pmi] bit-packed starts of masking units (PMI n-grams
                                              and single words; a subset of the word starts)
    static_selected.npy (B, K, ceil(L/8)) uint8  [static mode] bit-packed positions chosen in copy k
    static_inputs.npy   (S,)   token dtype    [static mode] input ids at the chosen positions, in C order

Tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0644, USTAR, no PAX header), so the same input
and config give byte-identical shards. `index.json` is written last; a dataset without it is incomplete.

Version 2 adds per record an xxh3_64 checksum of its tar bytes [offset, next offset or the shard's end: the
last record takes the end-of-archive marker] (`checksums` in each shard entry, beside `records`), checked by
the loader before a record is decoded, and `doc_starts.npy`. Version 1 datasets still read: without record
checks (a warning says so) and with each sequence one document.
.npy members are decoded from their bytes with their header checked first (dtype, shape, payload size against
the expected array), so no header can make the reader allocate more than the member's own bytes.
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
import xxhash

from maskstream.errors import UserError
from maskstream.loader.atomic import atomic_write, commit
from maskstream.loader.index_check import IndexProblem, check_index

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1: no record checksums, no document starts (read with a warning)
CHECKSUM = "xxh3_64"        # of a record's tar bytes [offset, end); see docs/design-notes.md for the choice
INDEX_FILE = "index.json"
PARTIAL_SUFFIX = ".partial"  # temporary names of shards being written; renamed when complete
MAX_MEMBER_BYTES = 64 << 20  # a reader refuses any member larger than this
MEMBERS = ("tokens.npy", "lengths.npy", "word_starts.npy", "uids.npy", "static_selected.npy",
           "static_inputs.npy", "doc_starts.npy", "unit_starts.npy")
_SHARD_NAME = re.compile(r"^shard-[0-9]{6}\.tar$")


class FormatError(UserError):
    """A shard or index that does not follow the format: refused, never read around."""


class OldFormatWarning(UserWarning):
    """A dataset of an older format version that still reads, with less checked (see loader.stages.load_index)."""


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
    doc_starts: np.ndarray | None = None         # (B, L) bool, True where a document starts inside a row (p >= 1)
    unit_starts: np.ndarray | None = None        # (B, L) bool, PMI masking unit starts (pipeline/pmi.py)

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
    if block.unit_starts is not None:
        # NOTE: bits, not offsets: nearly every word starts a unit, so offsets would cost ~30x the bits
        members["unit_starts.npy"] = _npy(np.packbits(block.unit_starts.astype(bool), axis=-1))
    if block.static_selected is not None:
        selected = block.static_selected.astype(bool)
        members["static_selected.npy"] = _npy(np.packbits(selected, axis=-1))
        members["static_inputs.npy"] = _npy(block.static_inputs[selected].astype(dtype))
    if block.doc_starts is not None and block.doc_starts.any():
        # NOTE: sparse offsets, not bits: documents span many rows in full packing, so a record holds a few
        # starts (4 bytes each) where a bit per token would cost 0.125 bytes/token; doc packing stores none.
        if block.doc_starts[:, 0].any():
            raise FormatError("a document start at position 0 of a row: a row's first document is implicit")
        members["doc_starts.npy"] = _npy(np.flatnonzero(block.doc_starts).astype(np.uint32))
    return members


def _array(members: dict[str, bytes], name: str, dtypes: tuple, shape: tuple, max_bytes: int) -> np.ndarray:
    """A member's array, its .npy header checked before any payload is read.

    `shape` entries of None match any size; the payload must then hold exactly the declared elements, so a
    header declaring 10**12 of them is refused, never allocated. The array is a read-only view of the bytes.
    """
    data = members.get(name)
    if data is None:
        raise FormatError(f"record lacks member {name!r}")
    if len(data) > max_bytes:
        raise FormatError(f"member {name!r} is {len(data)} bytes, over the limit of {max_bytes}")
    buf = io.BytesIO(data)
    try:  # NOTE: numpy.lib.format's public header readers parse the header dict with ast.literal_eval only
        version = np.lib.format.read_magic(buf)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f".npy version {version} is not 1.0 or 2.0")
        got_shape, fortran, dtype = read_header(buf)
    except ValueError as e:  # bad magic, malformed or oversized headers land here
        raise FormatError(f"member {name!r} is not a plain .npy array: {e}") from None
    if dtype not in [np.dtype(d) for d in dtypes]:
        raise FormatError(f"member {name!r} has dtype {dtype}, expected one of "
                          f"{[np.dtype(d).name for d in dtypes]}; it is not a plain .npy array of this format")
    if len(got_shape) != len(shape) or any(w is not None and g != w for g, w in zip(got_shape, shape, strict=True)):
        want = tuple("*" if w is None else w for w in shape)
        raise FormatError(f"member {name!r} has shape {got_shape}, expected {want}")
    count = int(np.prod(got_shape, dtype=np.float64))  # float: a hostile shape cannot overflow the product
    payload = len(data) - buf.tell()
    if fortran and len(got_shape) > 1 or count * dtype.itemsize != payload:
        raise FormatError(f"member {name!r} declares {got_shape} {dtype} ({count * dtype.itemsize:.0f} bytes"
                          f"{', Fortran order' if fortran else ''}) but holds {payload} bytes of data")
    return np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell()).reshape(got_shape)


def _doc_starts(members: dict[str, bytes], lengths: np.ndarray, L: int, max_bytes: int) -> np.ndarray:
    """(B, L) bool from the sparse doc_starts.npy (all False when absent): flat positions, increasing, each
    inside its row's real tokens and never at a row's position 0."""
    starts = np.zeros((len(lengths), L), dtype=bool)
    if "doc_starts.npy" not in members:
        return starts
    flat = _array(members, "doc_starts.npy", (np.uint32,), (None,), max_bytes).astype(np.int64)
    rows, cols = np.divmod(flat, L)
    if len(flat) and (np.any(np.diff(flat) <= 0) or rows[-1] >= len(lengths) or (cols == 0).any()
                      or (cols >= lengths[np.minimum(rows, len(lengths) - 1)]).any()):
        raise FormatError(f"member 'doc_starts.npy' holds positions that are not increasing, inside "
                          f"[1, length) of rows 0..{len(lengths) - 1}")
    starts.reshape(-1)[flat] = True
    return starts


def decode_block(members: dict[str, bytes], *, seq_len: int, vocab_size: int, static_copies: int = 0,
                 sequences: int | None = None, max_member_bytes: int = MAX_MEMBER_BYTES) -> Block:
    """Check and decode one record (of `sequences` rows when index.json says so). Unknown members (a `.pyd`,
    `.pkl` or `.pth` among them) are refused unread: nothing from a shard is ever unpickled."""
    unknown = sorted(set(members) - set(MEMBERS))
    if unknown:
        raise FormatError(f"record has members {unknown} that are not part of format v{FORMAT_VERSION} "
                          f"(allowed: {list(MEMBERS)}); refusing to decode it")
    L, limit = seq_len, max_member_bytes
    tokens = _array(members, "tokens.npy", (token_dtype(vocab_size),), (None, L), limit)
    B = tokens.shape[0]
    if sequences is not None and B != sequences:
        raise FormatError(f"holds {B} sequences, index.json says {sequences}; the shard is corrupt or truncated")
    if B and int(tokens.max()) >= vocab_size:
        raise FormatError(f"token id {int(tokens.max())} >= vocab size {vocab_size}")
    if "lengths.npy" in members:
        lengths = _array(members, "lengths.npy", (np.uint16, np.uint32), (B,), limit).astype(np.int32)
    else:  # absent: every row is full
        lengths = np.full(B, L, dtype=np.int32)
    if B and (lengths.max() > L or lengths.min() < 1):
        raise FormatError(f"lengths outside [1, {L}]")
    packed = _array(members, "word_starts.npy", (np.uint8,), (B, (L + 7) // 8), limit)
    word_starts = np.unpackbits(packed, axis=-1, count=L).astype(bool)
    uids = _array(members, "uids.npy", (np.uint64,), (B,), limit)
    block = Block(tokens=tokens, lengths=lengths, word_starts=word_starts, uids=uids,
                  doc_starts=_doc_starts(members, lengths, L, limit))
    if "unit_starts.npy" in members:
        packed = _array(members, "unit_starts.npy", (np.uint8,), (B, (L + 7) // 8), limit)
        block.unit_starts = np.unpackbits(packed, axis=-1, count=L).astype(bool)
        if (block.unit_starts & ~word_starts).any():
            raise FormatError("member 'unit_starts.npy' marks a unit start where no word starts; a unit is "
                              "one or more whole words")
    if static_copies:
        sel = _array(members, "static_selected.npy", (np.uint8,), (B, static_copies, (L + 7) // 8), limit)
        selected = np.unpackbits(sel, axis=-1, count=L).astype(bool)
        values = _array(members, "static_inputs.npy", (token_dtype(vocab_size),), (int(selected.sum()),), limit)
        inputs = np.broadcast_to(tokens[:, None, :], selected.shape).astype(np.int64)
        inputs[selected] = values
        block.static_selected, block.static_inputs = selected, inputs
    return block


def record_checksum(data: bytes) -> str:
    """The checksum index.json keeps for a record: xxh3_64 of its tar bytes, 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


# ---- writing shards ---------------------------------------------------------------------------------------

class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes (whole shard, and the current record) and counts what passes to `raw`."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0
        self.record = None  # xxh3_64 of the record being written (the last one takes the end-of-archive marker)

    def writable(self):
        return True

    def tell(self):
        return self.size

    def write(self, b):
        b = bytes(b)
        self.raw.write(b)
        self.sha.update(b)
        if self.record is not None:
            self.record.update(b)
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
        self._checksums: list[str] = []  # record_checksum() of each record, as the reader will compute it
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
        self._end_record()
        self._records.append([self._out.size, len(block)])  # the record's first header starts here
        self._out.record = xxhash.xxh3_64()
        for suffix, data in encode_block(block, vocab_size=self.vocab_size).items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            info.uname = info.gname = ""
            # NOTE: the tar is written by hand with tarfile's public TarInfo.tobuf(): a USTAR member is a
            # 512-byte header, the data, then zero padding to the next 512-byte block.
            self._out.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
            self._out.write(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        self._tokens += int(block.lengths.sum())

    def _end_record(self) -> None:
        if self._out.record is not None:
            self._checksums.append(self._out.record.hexdigest())
            self._out.record = None

    def close(self) -> dict:
        """Finish the tar, rename it into place (local mode) and return the shard's index entry."""
        # NOTE: the end-of-archive marker is two zero blocks; no padding to tarfile's 10 KiB record size,
        # which would be dead bytes in every shard.
        self._out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self._end_record()
        self._out.raw.flush()
        if self._final_path:
            commit(self._out.raw, self._temp_path, self._final_path)
        return {"name": self.name, "bytes": self._out.size, "sha256": self._out.sha.hexdigest(),
                "sequences": sum(n for _, n in self._records), "tokens": self._tokens,
                "records": self._records, "checksums": self._checksums}


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
        "format_version": FORMAT_VERSION, "checksum": CHECKSUM, "shards": entries,
        "counts": {**derived, **(counts or {})},
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
    """Parse and check a whole index.json (loader.index_check); refuses unknown versions, wrong types, missing
    keys, bad ranges and inconsistent counts, each with one line naming where."""
    try:
        index = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands of levels deep
        raise FormatError(f"{source} is not valid JSON ({type(e).__name__}: {str(e)[:80]}); the dataset is "
                          "incomplete or corrupt") from None
    if not isinstance(index, dict) or "format_version" not in index:
        raise FormatError(f"{source} has no format_version; not a maskstream dataset")
    try:
        check_index(index, readable=READABLE_VERSIONS, checksum=CHECKSUM)
    except IndexProblem as e:
        raise FormatError(f"{source}: {e}") from None
    for shard in index["shards"]:
        check_shard_name(shard["name"])
    return index


def shard_sha256(path: str) -> str:
    """sha256 of a local file, read in 1 MiB pieces."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            sha.update(piece)
    return sha.hexdigest()
