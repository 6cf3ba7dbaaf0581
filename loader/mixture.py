"""Weighted mixtures of datasets: the mixture file, and each global batch's sequences as a pure function of the step.

    {"sources": [{"path": "wiki/", "weight": 0.7, "name": "wiki"}, {"path": "code/", "weight": 0.3}],
     "epoch_sequences": 100000}

Each source has a `weight` (its share of every global batch) or, for all sources instead, a `repeat` (sequences
per epoch = repeat x its size; the shares follow). An epoch is `epoch_sequences` or `epoch_tokens` (real tokens,
from the sources' counts), by default every source once (weights) or repeat times (repeats). Paths are relative
to the mixture file. The stream is one endless run of global batches of G = world x batch sequences:

1. counts: global step s takes c_i(s) sequences from source i, floor or ceil of w_i * G (so every global batch
   holds each share to within one sequence); which sources get the rounded-up extra is the largest remainder
   carried across steps (credits), so the long-run share is exact;
2. partitions: each of the P canonical partitions gets g = G / P of a step's seats: c_i // P of every source,
   and the c_i % P extras one per partition, filled so each source reaches every partition evenly over the
   steps (the partitions it has given least to first);
3. sources: partition q reads its own sub-stream of each source: pass pi of source i is the source's epoch
   stream for epoch pi (records and sequences permuted by (seed, pi), as for one dataset) cut into P chunks of
   N_i // P on record boundaries, as one dataset's partitions are; chunk q of pass 0, then of pass 1, ... (the
   N_i % P sequences no chunk takes are skipped, others each pass). A sequence's masks are keyed by (seed,
   pass, uid): an upsampled source gets a fresh order and fresh masks on every pass, and no sequence repeats
   within a pass.

Everything is a pure function of (sources, weights, seed, G, P, step): any worker count, any world size that
divides P (rank r owns partitions [r*P/W, (r+1)*P/W)), and exact resume from the step alone. The counts of
steps before s are replayed (tens of microseconds a step), from the nearest cursor kept in the process; a
loader state carries the cursors of its epoch's start and of its step, so resuming replays nothing before them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import urllib.parse
from dataclasses import dataclass, field
from fractions import Fraction

from maskstream.errors import UserError
from maskstream.loader.order import BatchSpec, cut_partitions, epoch_order

SNAPSHOT_EVERY = 1024  # steps between the cursors a process keeps; cursor(s) replays from the nearest below s


@dataclass(frozen=True, kw_only=True)
class MixSource:
    """One dataset of a mixture: where it is, and its weight (share of every batch) or repeat (passes per epoch)."""
    path: str
    weight: float | None = None
    repeat: float | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or os.path.basename(self.path.rstrip("/")) or self.path


@dataclass(frozen=True, kw_only=True)
class Mixture:
    """Several datasets read as one, in fixed proportions (see the module docstring)."""
    sources: tuple[MixSource, ...]
    epoch_sequences: int | None = None
    epoch_tokens: int | None = None
    name: str = "mixture"

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        where = f"mixture {self.name}"
        if not self.sources:
            raise UserError(f"{where} has no sources; give at least one {{\"path\": ..., \"weight\": ...}}")
        kinds = {("weight" if s.weight is not None else "") + ("repeat" if s.repeat is not None else "")
                 for s in self.sources}
        if kinds not in ({"weight"}, {"repeat"}):
            raise UserError(f"{where}: every source needs a weight (its share of each batch), or every source a "
                            f"repeat (passes per epoch), not both or a mix; found {sorted(kinds)}")
        for s in self.sources:
            value = s.weight if s.weight is not None else s.repeat
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"{where}: source {s.label} has weight/repeat {value!r}; it must be a number > 0")
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise UserError(f"{where}: source names {labels} repeat; give each source a distinct \"name\"")
        if self.epoch_sequences is not None and self.epoch_tokens is not None:
            raise UserError(f"{where}: give epoch_sequences or epoch_tokens, not both")
        for key in ("epoch_sequences", "epoch_tokens"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise UserError(f"{where}: {key}={v!r} must be a whole number >= 1")


_FILE_KEYS = {"sources", "epoch_sequences", "epoch_tokens"}
_SOURCE_KEYS = {"path", "weight", "repeat", "name"}


def read_mixture(path: str) -> Mixture:
    """A mixture file: JSON with `sources` (path, weight | repeat, name) and an optional epoch size."""
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"mixture file {path}: cannot be read as JSON ({e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("sources"), list):
        raise UserError(f"mixture file {path}: expected {{\"sources\": [{{\"path\": ..., \"weight\": ...}}, ...]}}")
    unknown = set(spec) - _FILE_KEYS
    if unknown:
        raise UserError(f"mixture file {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_FILE_KEYS)}")
    here = os.path.dirname(os.path.abspath(path))
    sources = []
    for i, s in enumerate(spec["sources"]):
        if not isinstance(s, dict) or not isinstance(s.get("path"), str) or set(s) - _SOURCE_KEYS:
            raise UserError(f"mixture file {path}: source {i} is {s!r}; each is {{\"path\": str, \"weight\" or "
                            f"\"repeat\": number, \"name\": str (optional)}}")
        p = s["path"]
        if len(urllib.parse.urlsplit(p).scheme) <= 1 and not os.path.isabs(p):
            p = os.path.join(here, p)  # relative to the mixture file, like an import
        sources.append(MixSource(path=p, weight=s.get("weight"), repeat=s.get("repeat"),
                                 name=s.get("name") or s["path"].rstrip("/").rsplit("/", 1)[-1]))
    return Mixture(sources=tuple(sources), epoch_sequences=spec.get("epoch_sequences"),
                   epoch_tokens=spec.get("epoch_tokens"), name=path)


def resolve(data) -> Mixture | None:
    """The mixture `data` names (a Mixture, or a path to a .json mixture file), else None (one dataset)."""
    if isinstance(data, Mixture):
        return data
    if isinstance(data, (str, os.PathLike)) and str(data).endswith(".json") and os.path.isfile(data):
        return read_mixture(str(data))
    return None


def check_compatible(mixture: Mixture, datasets) -> None:
    """Sources must share the tokenizer (sha256 in index.json) and sequence length, and mask dynamically."""
    first, a = mixture.sources[0], datasets[0].index
    for s, ds in zip(mixture.sources[1:], datasets[1:], strict=True):
        b = ds.index
        for what, get in (("tokenizer sha256", lambda ix: ix["tokenizer"].get("sha256")),
                          ("vocabulary size", lambda ix: ix["tokenizer"]["vocab_size"]),
                          ("sequence length", lambda ix: ix["seq_len"])):
            if get(a) != get(b):
                raise UserError(f"mixture {mixture.name}: sources must share the {what}, but {first.label} "
                                f"({first.path}) has {get(a)!r} and {s.label} ({s.path}) has {get(b)!r}; "
                                f"preprocess them with the same tokenizer and --seq-len")
    for s, ds in zip(mixture.sources, datasets, strict=True):
        if ds.index["masking"]["mode"] == "static":
            raise UserError(f"mixture {mixture.name}: source {s.label} ({s.path}) stores static masks, which "
                            f"cannot change on each pass of a source; preprocess it with --masking dynamic")


def shares(mixture: Mixture, datasets) -> list[Fraction]:
    """Each source's exact share of every batch (weights normalized; repeats times sizes)."""
    # NOTE: Fraction(str(x)) reads 0.7 as 7/10, as written, not as the binary float nearest to it
    if mixture.sources[0].weight is not None:
        raw = [Fraction(str(s.weight)) for s in mixture.sources]
    else:
        raw = [Fraction(str(s.repeat)) * ds.table.num_sequences
               for s, ds in zip(mixture.sources, datasets, strict=True)]
    total = sum(raw)
    return [w / total for w in raw]


def epoch_sequences(mixture: Mixture, datasets, share: list[Fraction]) -> int:
    """Sequences per epoch: as given, from epoch_tokens, or every source once (weights) / repeat times."""
    if mixture.epoch_sequences is not None:
        return mixture.epoch_sequences
    sizes = [ds.table.num_sequences for ds in datasets]
    if mixture.epoch_tokens is not None:  # real tokens per sequence, the mixture's mean
        per_seq = sum(float(w) * ds.index["counts"].get("tokens", n * ds.index["seq_len"]) / n
                      for w, ds, n in zip(share, datasets, sizes, strict=True))
        return max(1, math.ceil(mixture.epoch_tokens / per_seq))
    if mixture.sources[0].weight is not None:
        return sum(sizes)
    return sum(round(s.repeat * n) for s, n in zip(mixture.sources, sizes, strict=True))


def fingerprint(mixture: Mixture, datasets, share, epoch_size: int) -> str:
    """What a loader state must match: every source's index.json, its share and the epoch size."""
    spec = [[ds.fingerprint, str(w)] for ds, w in zip(datasets, share, strict=True)] + [epoch_size]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


# ---- the plan: counts per step, per partition, and each source's passes -------------------------------------

@dataclass
class Cursor:
    """Where the stream stands before global step `step`: credits, sequences taken per source and partition."""
    step: int
    credit: list[int]          # per source, carried remainders in 1/denominator units
    taken: list[int]           # per source: A_i, sequences taken so far
    taken_by: list[list[int]]  # per source, per partition: J_iq, the position in sub-stream (i, q)

    def copy(self) -> Cursor:
        return Cursor(self.step, list(self.credit), list(self.taken), [list(js) for js in self.taken_by])

    def to_list(self) -> list:
        return [self.step, list(self.credit), list(self.taken), [list(js) for js in self.taken_by]]

    @classmethod
    def from_list(cls, value, plan: MixPlan) -> Cursor:
        """A cursor saved by to_list() in a loader state, checked against what every cursor of `plan` obeys."""
        try:
            step, credit, taken, taken_by = value
            cur = cls(int(step), [int(c) for c in credit], [int(a) for a in taken],
                      [[int(j) for j in js] for js in taken_by])
        except (TypeError, ValueError) as e:
            raise ValueError(f"loader state mix_cursors: {value!r:.200} is not [step, credits, taken, "
                             f"taken_by] ({e})") from None
        k, p, g = len(plan.share), plan.partitions, plan.global_batch // plan.partitions
        if not (cur.step >= 0 and len(cur.credit) == len(cur.taken) == len(cur.taken_by) == k
                and all(len(js) == p and min(js) >= 0 for js in cur.taken_by)
                and all(a == sum(js) for a, js in zip(cur.taken, cur.taken_by, strict=True))
                and all(sum(col) == cur.step * g for col in zip(*cur.taken_by, strict=True))
                and sum(cur.credit) == 0):
            raise ValueError(f"loader state mix_cursors: the cursor of step {cur.step} does not fit this mixture "
                             f"({k} sources, {p} partitions of {g} sequences a step); the checkpoint is damaged "
                             f"or from another mixture")
        return cur


@dataclass
class MixPlan:
    """The endless stream of global batches of a mixture (module docstring); cursors are cached per process."""
    tables: tuple
    share: tuple[Fraction, ...]
    global_batch: int
    partitions: int
    seed: int
    steps_per_epoch: int
    layout: str = "records"  # how each pass is cut into partitions (order.cut_partitions)
    _snapshots: dict = field(default_factory=dict, repr=False)
    _orders: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        denom = math.lcm(*(w.denominator for w in self.share))
        self.denominator = denom
        quota = [self.global_batch * w.numerator * (denom // w.denominator) for w in self.share]
        self.base = tuple(q // denom for q in quota)     # floor(w_i G)
        self.frac = tuple(q % denom for q in quota)      # fractional part of w_i G, in 1/denom units
        self.extra = sum(self.frac) // denom             # seats left after the floors
        self.chunk = tuple(t.num_sequences // self.partitions for t in self.tables)  # N_i // P

    def advance(self, cur: Cursor) -> tuple[list[int], list[list[int]]]:
        """Step cur past cur.step (in place); returns that step's c_i and c_iq."""
        credit, k = cur.credit, len(cur.credit)
        for i in range(k):
            credit[i] += self.frac[i]
        counts = list(self.base)
        # the `extra` seats left after the floors go to the largest carried remainders (ties: lower source)
        for i in sorted(range(k), key=lambda i: (-credit[i], i))[:self.extra]:
            counts[i] += 1
            credit[i] -= self.denominator
        rows = self.dealt(cur.step, counts, cur.taken_by)
        for i in range(k):
            cur.taken[i] += counts[i]
            js, row = cur.taken_by[i], rows[i]
            for q in range(self.partitions):
                js[q] += row[q]
        cur.step += 1
        return counts, rows

    def dealt(self, step: int, counts: list[int], taken_by) -> list[list[int]]:
        """c_iq: each source's c_i // P to every partition, then its c_i % P extras one per partition.

        The extras fill each partition to exactly g: Ryser's greedy (a source's extras go to the partitions with
        the most room left; for a 0/1 matrix with these row and column sums it never gets stuck), ties going to
        the partitions the source has given least so far, so each source reaches every partition evenly.
        """
        p, k = self.partitions, len(counts)
        rows = [[c // p] * p for c in counts]
        extras = [c % p for c in counts]
        if not any(extras):
            return rows
        room = [sum(extras) // p] * p
        for i in sorted(range(k), key=lambda i: (-extras[i], (i - step) % k)):
            if extras[i]:
                js = taken_by[i]
                best = sorted((-room[q], js[q], (q - step) % p, q) for q in range(p))[:extras[i]]
                for *_, q in best:
                    rows[i][q] += 1
                    room[q] -= 1
        return rows

    def keep(self, cur: Cursor) -> None:
        """Keep a known cursor (a loader state's), so that cursor(s) for s >= its step replays from it."""
        self._snapshots[cur.step] = cur.copy()

    def cursor(self, step: int) -> Cursor:
        """A copy of the cursor before global step `step`, replayed from the nearest kept snapshot."""
        k = len(self.share)
        below = [s for s in self._snapshots if s <= step]
        cur = self._snapshots[max(below)].copy() if below else \
            Cursor(0, [0] * k, [0] * k, [[0] * self.partitions for _ in range(k)])
        while cur.step < step:
            self.advance(cur)
            if cur.step % SNAPSHOT_EVERY == 0:
                self._snapshots[cur.step] = cur.copy()
        return cur

    def epoch(self, epoch: int, world_size: int, start_batch: int = 0) -> MixEpoch:
        """The batches of one epoch from start_batch on, ready to pickle into DataLoader workers."""
        cur = self.cursor(epoch * self.steps_per_epoch + start_batch)
        return MixEpoch(self, epoch, world_size, start_batch, cur)

    def segments(self, source: int, partition: int, first: int, count: int) -> list:
        """Record segments of sub-stream (source, partition) positions [first, first + count), pass by pass."""
        chunk, out = self.chunk[source], []
        while count:
            pss, off = divmod(first, chunk)
            n = min(count, chunk - off)
            parts = self._orders.get((source, pss))
            if parts is None:  # the few passes a worker is reading are kept
                if len(self._orders) > 4 * len(self.tables):
                    self._orders.clear()
                order = epoch_order(self.tables[source], seed=self.seed, epoch=pss, source=source)
                parts = self._orders[source, pss] = cut_partitions(order, self.partitions, chunk, self.layout)
            out += parts.segments(partition, off, n)
            first, count = first + n, count - n
        return out

    def __getstate__(self):  # the caches stay in the process that made them
        return {**self.__dict__, "_snapshots": {}, "_orders": {}}


@dataclass
class MixEpoch:
    """One epoch of a MixPlan for one world size, from a known cursor: what EpochStream's `plan` asks."""
    plan: MixPlan
    epoch: int
    world_size: int
    start_batch: int
    start: Cursor

    def specs(self, rank: int, start_batch: int):
        """Stage: the rank's batches from start_batch to the epoch's end, as BatchSpecs."""
        assert start_batch == self.start_batch, (start_batch, self.start_batch)
        plan, cur = self.plan, self.start.copy()
        per_rank = plan.partitions // self.world_size
        for b in range(start_batch, plan.steps_per_epoch):
            _, rows = plan.advance(cur)
            segments = []
            for q in range(rank * per_rank, (rank + 1) * per_rank):
                for i, row in enumerate(rows):
                    if row[q]:  # positions [J_iq before this step, + c_iq) of sub-stream (i, q)
                        segments += plan.segments(i, q, cur.taken_by[i][q] - row[q], row[q])
            yield BatchSpec(b, tuple(segments))
