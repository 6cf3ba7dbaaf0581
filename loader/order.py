"""The loader's order: which sequences each rank and worker gets in each epoch, as pure functions.

The unit of distribution is the record (a block of sequences, one seekable tar record; index.json gives each
record's byte offset and sequence count). For an epoch:

1. the global list of records is permuted by a keyed hash of (seed, epoch, record number);
2. within each record, sequences are permuted by a keyed hash of (seed, epoch, uid);
3. concatenated, this is the global epoch stream of N sequences, a pure function of (seed, epoch);
4. the stream is cut into P canonical partitions of S = nb * g sequences each, where G = world * B is the
   global batch, g = G / P and nb = N // G with remainder "drop" (N - nb*G sequences are left out, different
   ones every epoch since the order changes) or ceil with "wrap" (the stream is extended from its start).
   Partitions are cut on record boundaries (`cut_partitions`): partition q takes the next whole records of
   the stream while they fit in S, and its last S - (what they hold) sequences are a piece of one of the
   records after the last partition's run (fillers, given out best fit). A partition thus reads at most one
   record it does not wholly consume, where cutting the stream at q*S would cut two (one at each end);
   the filler sequences no partition takes are the ones left out. With "wrap" (P*S > N) the extended
   stream is cut at q*S, so that every sequence is taken at least once. Global batch b is, partition after
   partition, positions [b*g, (b+1)*g) of each partition q;
5. rank r owns the partitions [r*P/W, (r+1)*P/W) and its batch b is their slices of global batch b, so a rank
   reads only its partitions' records, and every W that divides P gives the same global batches (elastic
   resume: W*B = W'*B'). P defaults to the world size, which is the plain contiguous split per rank;
6. worker w of W yields the rank's batches b with (b - start) % W == w, so torch's DataLoader, which asks its
   workers in turn, delivers batches start, start+1, ... whatever W is.

NOTE: this replaces webdataset's shuffle buffer. A buffer's content depends on everything read before, so it
cannot be resumed by seeking; a keyed permutation of records plus a keyed permutation inside each record can:
the position of any sequence in any epoch is computable without reading anything.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from maskstream.errors import UserError

REMAINDERS = ("drop", "wrap")
LAYOUTS = ("records", "contiguous")  # contiguous: partition q is stream positions [q*S, (q+1)*S) (before v3)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (bijective; wraps modulo 2**64 by design)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_key(seed: int, epoch: int, salt: int) -> np.uint64:
    """One uint64 key per (seed, epoch, salt); salt separates the record order from the in-record order."""
    k = mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    k = mix64(k ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
    return mix64(k ^ np.uint64(salt))[0]


def record_permutation(num_records: int, *, seed: int, epoch: int) -> np.ndarray:
    """(R,) int64: the epoch's record order, the argsort of keyed hashes of the record numbers."""
    keys = mix64(np.arange(num_records, dtype=np.uint64) ^ epoch_key(seed, epoch, 1))
    return np.argsort(keys, kind="stable")


def in_record_permutation(uids: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
    """(n,) int64: the epoch's order of a record's sequences, from keyed hashes of their uids."""
    keys = mix64(np.asarray(uids, dtype=np.uint64) ^ epoch_key(seed, epoch, 2))
    return np.argsort(keys, kind="stable")


@dataclass(frozen=True)
class RecordTable:
    """Every record of a dataset, in index.json order: shard number, byte range and sequence count."""
    shard: np.ndarray      # (R,) int64
    offset: np.ndarray     # (R,) int64, byte offset of the record's first tar header
    end: np.ndarray        # (R,) int64, byte offset after the record (next record, or the shard's end)
    sequences: np.ndarray  # (R,) int64

    @classmethod
    def from_index(cls, index: dict) -> "RecordTable":
        shard, offset, end, seqs = [], [], [], []
        for s, entry in enumerate(index["shards"]):
            records = entry["records"]
            total = 0
            for r, (off, n) in enumerate(records):
                nxt = records[r + 1][0] if r + 1 < len(records) else entry["bytes"]
                if not 0 <= off < nxt <= entry["bytes"] or n < 1:
                    raise ValueError(f"index.json: shard {entry['name']} record {r} has offset {off}, "
                                     f"end {nxt}, {n} sequences; offsets must increase inside the shard's "
                                     f"{entry['bytes']} bytes and records hold >= 1 sequence; rewrite the dataset")
                shard.append(s), offset.append(off), end.append(nxt), seqs.append(n)
                total += n
            if total != entry["sequences"]:
                raise ValueError(f"index.json: shard {entry['name']} records hold {total} sequences but the "
                                 f"shard says {entry['sequences']}; the index is inconsistent, rewrite it")
        as64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
        return cls(as64(shard), as64(offset), as64(end), as64(seqs))

    @property
    def num_sequences(self) -> int:
        return int(self.sequences.sum())


@dataclass(frozen=True)
class Segment:
    """Positions [lo, hi) of one record in its epoch order (after the in-record permutation of `epoch`)."""
    record: int
    lo: int
    hi: int
    source: int = 0   # which dataset of a mixture
    epoch: int = 0    # the epoch (a mixture source's pass) that keys the in-record order and the masks


@dataclass(frozen=True)
class BatchSpec:
    """Batch `index` of a rank in an epoch: the record segments that make it, in order."""
    index: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class Order:
    """The stream of one dataset in one epoch: its records in epoch order and where each starts."""
    records: np.ndarray   # (R,) record numbers in epoch order
    starts: list          # stream position of each record in epoch order, plus N at the end
    epoch: int
    source: int = 0

    @property
    def num_sequences(self) -> int:
        return self.starts[-1]

    def segments(self, pos: int, count: int) -> list[Segment]:
        """The record segments of stream positions [pos, pos + count), modulo N (wrapping)."""
        n, segments = self.num_sequences, []
        while count:
            p = pos % n
            j = bisect.bisect_right(self.starts, p) - 1
            lo = p - self.starts[j]
            hi = min(self.starts[j + 1] - self.starts[j], lo + count)
            segments.append(Segment(int(self.records[j]), lo, hi, self.source, self.epoch))
            count -= hi - lo
            pos += hi - lo
        return segments


def epoch_order(table: RecordTable, *, seed: int, epoch: int, source: int = 0) -> Order:
    """Stage 1 of the order: the records permuted for (seed, epoch)."""
    records = record_permutation(len(table.sequences), seed=seed, epoch=epoch)
    return Order(records, [0] + np.cumsum(table.sequences[records]).tolist(), epoch, source)


@dataclass(frozen=True)
class Partitions:
    """A stream cut into P partitions of `size` sequences, each a few spans (stream position, length)."""
    order: Order
    size: int
    spans: tuple[tuple[tuple[int, int], ...], ...]

    def segments(self, partition: int, first: int, count: int) -> list[Segment]:
        """The record segments of positions [first, first + count) of one partition."""
        if not 0 <= first <= first + count <= self.size:
            raise IndexError(f"positions [{first}, {first + count}) outside a partition of {self.size}")
        out = []
        for start, length in self.spans[partition]:
            if count and first < length:
                n = min(count, length - first)
                out += self.order.segments(start + first, n)
                count -= n
            first = max(0, first - length)
        return out


def cut_partitions(order: Order, partitions: int, size: int, layout: str = "records") -> Partitions:
    """Stage 4 of the order: P partitions of `size` sequences from the stream.

    "records": each partition is a run of whole records (the next ones of the stream while they fit) and then
    filler pieces for the rest, cut from the records after the last run: the partitions' needs, largest first,
    each from the filler with the least room that holds all of it (best fit; the roomiest gives what it has when
    none does), so a partition touches one record it does not wholly consume and rarely two. When that cut
    makes some partition read more sequences it does not consume than the plain cut at q * S would (records
    larger than a partition, or little left over to fill from), the plain cut is taken: the worst partition
    never reads more than it does there.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; choose one of {LAYOUTS}")
    n, starts = order.num_sequences, order.starts
    plain = Partitions(order, size, tuple(((q * size, size),) for q in range(partitions)))
    if layout == "contiguous" or partitions * size > n:  # wrap: the stream is extended from its start
        return plain

    def record_at(pos: int) -> tuple[int, int]:  # (start, length) of the record holding stream position pos
        copy, p = divmod(pos, n)
        j = bisect.bisect_right(starts, p) - 1
        return copy * n + starts[j], starts[j + 1] - starts[j]

    def worst_waste(parts: Partitions) -> int:  # the most sequences a partition reads and does not consume
        def waste(start, length):
            head, _ = record_at(start)
            tail, last = record_at(start + length - 1)
            return start - head + tail + last - start - length
        return max(sum(waste(*span) for span in spans) for spans in parts.spans)

    runs, pos = [], 0
    for _ in range(partitions):
        start, _ = record_at(pos + size)  # the whole records from pos that fit end where this one starts
        runs.append((pos, start - pos))
        pos = start
    needs = [size - length for _, length in runs]
    fillers = []
    while pos < n:
        fillers.append(record_at(pos))
        pos += fillers[-1][1]
    room = sorted((length, i) for i, (_, length) in enumerate(fillers))  # (room left, filler)
    pieces = [[] for _ in range(partitions)]
    for q in sorted(range(partitions), key=lambda q: (-needs[q], q)):
        need = needs[q]
        while need:
            k = min(bisect.bisect_left(room, (need, -1)), len(room) - 1)
            left, i = room.pop(k)
            take = min(need, left)
            start, length = fillers[i]
            pieces[q].append((start + length - left, take))
            need -= take
            if left > take:
                bisect.insort(room, (left - take, i))
    cut = Partitions(order, size, tuple(((run,) if run[1] else ()) + tuple(pieces[q]) for q, run in enumerate(runs)))
    return cut if worst_waste(cut) <= worst_waste(plain) else plain


@dataclass(frozen=True)
class EpochPlan:
    """The epoch stream of one (seed, epoch), cut into canonical partitions and equal per-rank batches."""
    order: Order
    batch_size: int
    world_size: int
    batches_per_rank: int
    partitions: int
    parts: Partitions

    @property
    def records(self) -> np.ndarray:
        return self.order.records

    @property
    def num_sequences(self) -> int:
        return self.order.num_sequences

    @property
    def dropped(self) -> int:
        return remainder_counts(self.num_sequences, self.batches_per_rank, batch_size=self.batch_size,
                                world_size=self.world_size)[0]

    @property
    def wrapped(self) -> int:
        return remainder_counts(self.num_sequences, self.batches_per_rank, batch_size=self.batch_size,
                                world_size=self.world_size)[1]

    def batch(self, rank: int, b: int) -> BatchSpec:
        """The segments of batch b of rank r: slice b of each of the rank's partitions, in partition order."""
        per_rank = self.partitions // self.world_size
        g = self.batch_size // per_rank  # sequences each partition gives to a global batch
        segments = []
        for q in range(rank * per_rank, (rank + 1) * per_rank):
            segments += self.parts.segments(q, b * g, g)
        return BatchSpec(b, tuple(segments))

    def specs(self, rank: int, start_batch: int = 0):
        return split_by_rank(self, rank, start_batch)


def check_partitions(partitions: int, *, world_size: int, batch_size: int) -> int:
    """P, the canonical partitions (0 means the world size): W must divide P and P must divide W * B."""
    p = partitions or world_size
    if p < 1 or p % world_size:
        raise UserError(f"partitions={p} cannot be shared by world_size={world_size} ranks: each rank reads "
                        f"whole partitions, so the world size must divide the partition count; choose "
                        f"partitions as a multiple of every world size the run may use (e.g. 8 for 1, 2, 4 "
                        f"or 8 ranks)")
    if (world_size * batch_size) % p:
        raise UserError(f"the global batch world_size x batch_size = {world_size} x {batch_size} = "
                        f"{world_size * batch_size} is not a multiple of partitions={p}: every partition gives "
                        f"the same number of sequences to each global batch; choose a batch size that makes "
                        f"it one, or other partitions")
    return p


def batches_per_rank(n: int, *, batch_size: int, world_size: int, remainder: str,
                     source: str = "the dataset") -> int:
    """nb: N // (world * B) with "drop", ceil with "wrap"; refuses a dataset smaller than one batch per rank."""
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder={remainder!r}; choose one of {REMAINDERS}")
    per_step = world_size * batch_size
    nb = n // per_step if remainder == "drop" else -(-n // per_step)
    if nb == 0:
        raise UserError(f"{source} holds {n} sequences, fewer than one batch per rank (world_size="
                        f"{world_size} x batch_size={batch_size} = {per_step}); pass a smaller --batch-size "
                        f"(remainder='wrap' in code), or add data")
    return nb


def remainder_counts(n: int, nb: int, *, batch_size: int, world_size: int) -> tuple[int, int]:
    """(dropped, wrapped): sequences left out of, or repeated in, an epoch of nb batches per rank."""
    total = nb * world_size * batch_size
    return max(0, n - total), max(0, total - n)


def plan_epoch(table: RecordTable, *, seed: int, epoch: int, batch_size: int, world_size: int,
               remainder: str, partitions: int = 0, layout: str = "records") -> EpochPlan:
    """Stages 1 to 4 of the order: permute the records, size the equal partitions, cut them from the stream."""
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder={remainder!r}; choose one of {REMAINDERS}")
    p = check_partitions(partitions, world_size=world_size, batch_size=batch_size)
    order = epoch_order(table, seed=seed, epoch=epoch)
    nb = batches_per_rank(order.num_sequences, batch_size=batch_size, world_size=world_size, remainder=remainder)
    parts = cut_partitions(order, p, nb * world_size * batch_size // p, layout)
    return EpochPlan(order, batch_size, world_size, nb, p, parts)


def split_by_rank(plan: EpochPlan, rank: int, start_batch: int = 0):
    """Stage: the rank's batches from start_batch on, as BatchSpecs."""
    if not 0 <= rank < plan.world_size:
        raise ValueError(f"rank={rank} outside world_size={plan.world_size}")
    for b in range(start_batch, plan.batches_per_rank):
        yield plan.batch(rank, b)


def split_by_worker(specs, worker: int, num_workers: int, start_batch: int = 0):
    """Stage: the batches of worker w of W, those with (index - start_batch) % W == w, in order."""
    for spec in specs:
        if (spec.index - start_batch) % num_workers == worker:
            yield spec
