"""A local cache of a remote dataset's records: fetched once, checked, shared by every worker and rank on the machine.

    LoaderConfig(cache_dir="/local/ssd/ms-cache", cache_limit_bytes=50 * 2**30)

Each record (the byte range one read asks for) is a file `DIR/FINGERPRINT/shard-NNNNNN.tar.OFFSET-END` holding the
bytes and an 8-byte trailer (crc32 and a magic), put in place by loader.atomic (temp file, rename), so a reader
sees a whole record or none. FINGERPRINT is the sha256 of the dataset's index.json: a cache of another dataset,
or of another version of this one, is never read. A record is kept only if it matches its checksum in index.json
(format v2), and a hit is checked (length, crc32 and that checksum; a bad file is fetched again) and its mtime
touched; when a write would pass the limit, the least recently used files are removed first, down to 90 % of
the limit. The folder is the only shared state (no shared memory, no locks):
processes that race write the same bytes, and one that finds a file gone just fetches it again. Each process
keeps the folder's size as an estimate, rescanned when it passes the limit (and every RESCAN_EVERY writes), so
the limit holds to within a record per process.
Records being batched are held in memory by the reader, never only in the cache: eviction cannot deadlock.
"""
from __future__ import annotations

import os
import struct
import zlib

from maskstream.errors import UserError
from maskstream.loader.atomic import atomic_write
from maskstream.loader.format import check_shard_name, record_checksum
from maskstream.loader.storage import LocalSource

MAGIC = b"MSC1"
TRAILER = 8  # crc32 (little-endian uint32) + MAGIC
RESCAN_EVERY = 256  # puts between rescans of the folder's size, so other processes' writes are seen


class RecordCache:
    """A source wrapper with the same two reads; shard ranges come from the folder when they are there."""

    def __init__(self, inner, *, cache_dir: str, index: dict, table, fingerprint: str, limit_bytes: int | None):
        self.inner, self.root, self.limit = inner, inner.root, limit_bytes
        self.dir = os.path.join(cache_dir, fingerprint)
        # format v2: each record's checksum, by its byte range; a record that fails it is never kept
        sums = [c for e in index["shards"] for c in e.get("checksums") or [None] * len(e["records"])]
        self.checksums = {(index["shards"][s]["name"], int(a), int(b)): c
                          for s, a, b, c in zip(table.shard, table.offset, table.end, sums, strict=True)}
        self.hits = self.misses = 0
        self._used, self._puts = None, 0  # this process's estimate of the folder's bytes

    def read_index(self) -> bytes:
        return self.inner.read_index()

    def read_range(self, name: str, offset: int, end: int, size: int) -> bytes:
        path = os.path.join(self.dir, f"{check_shard_name(name)}.{offset}-{end}")
        want = self.checksums.get((name, offset, end))
        data = self._hit(path, end - offset)
        if data is not None and (want is None or record_checksum(data) == want):
            self.hits += 1
            return data
        self.misses += 1
        data = self.inner.read_range(name, offset, end, size)  # its size checked against index.json
        if want is None or record_checksum(data) == want:  # else the reader refuses it, naming the record
            self._put(path, data)
        return data

    def _hit(self, path: str, want: int) -> bytes | None:
        try:
            with open(path, "rb") as f:
                blob = f.read(want + TRAILER + 1)
        except FileNotFoundError:
            return None
        data, trailer = blob[:-TRAILER], blob[-TRAILER:]
        if len(blob) != want + TRAILER or trailer != struct.pack("<I", zlib.crc32(data)) + MAGIC:
            _remove(path)  # torn by a crash or damaged: fetch it again
            return None
        try:
            os.utime(path)  # least recently used = oldest mtime
        except FileNotFoundError:  # evicted by another process meanwhile; the bytes are good
            pass
        return data

    def _put(self, path: str, data: bytes) -> None:
        n = len(data) + TRAILER
        if self.limit is not None:
            self._make_room(n)
        # NOTE: no fsync: a cache file cut short by a crash fails its crc32 and is fetched again
        atomic_write(path, data + struct.pack("<I", zlib.crc32(data)) + MAGIC, durable=False)
        if self._used is not None:
            self._used += n

    def _make_room(self, n: int) -> None:
        self._puts += 1
        if self._used is None or self._puts % RESCAN_EVERY == 0 or self._used + n > self.limit:
            # NOTE: down to a low-water mark, so a full cache is rescanned once per tenth of its limit written,
            # not at every write
            self._used = self._evict(min(self.limit - n, self.limit * 9 // 10))

    def _evict(self, keep: int) -> int:
        """Remove the least recently used files until the folder holds at most `keep` bytes; returns its bytes."""
        entries = []
        try:
            with os.scandir(self.dir) as it:
                for e in it:
                    if not e.name.startswith("."):  # another process's temp file, still being written
                        try:
                            st = e.stat()
                        except FileNotFoundError:
                            continue
                        entries.append((st.st_mtime_ns, e.name, st.st_size))
        except FileNotFoundError:
            return 0
        used = sum(size for _, _, size in entries)
        for _, name, size in sorted(entries):
            if used <= keep:
                break
            _remove(os.path.join(self.dir, name))
            used -= size
        return used

    def __getstate__(self):  # each worker process keeps its own estimate and counters
        return {**self.__dict__, "_used": None, "_puts": 0, "hits": 0, "misses": 0}


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def is_remote(source) -> bool:
    """Whether a source reads over a network (a local folder is read in place, never cached)."""
    return not isinstance(source, LocalSource)


def check_limit(limit: int | None, datasets, batches, *, rank: int) -> None:
    """Refuse a limit below what one batch needs: the bytes of the records of each of the rank's batches."""
    if limit is None:
        return
    cached = {i for i, ds in enumerate(datasets) if isinstance(ds.source, RecordCache)}
    need, at = 0, None
    for spec in batches:
        records = {(s.source, s.record) for s in spec.segments if s.source in cached}
        n = sum(int(datasets[i].table.end[r] - datasets[i].table.offset[r]) + TRAILER for i, r in records)
        if n > need:
            need, at = n, spec.index
    if need > limit:
        raise UserError(f"cache_limit_bytes={limit:,} is below what one batch needs: batch {at} of rank {rank} "
                        f"reads {need:,} bytes of records; raise cache_limit_bytes to at least {need:,}, or "
                        f"pass cache_limit_bytes=None for no limit")
