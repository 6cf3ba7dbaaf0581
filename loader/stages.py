"""The loader's stages: small generator functions (iterator in, iterator out), webdataset style.

Run inside each DataLoader worker, in this order (EpochStream wires them; loader/stream.py drives them):

    plan.specs (this rank's batches)  -> split_by_worker -> read_records -> decode
    -> unbatch (in-record permutation) -> batch -> [finish: mask, when mask_on="worker"]

and `finish` runs last, on the training device, for mask_on="device". The plan is an order.EpochPlan (one
dataset) or a mixture.MixEpoch (several); either yields BatchSpecs whose segments name their dataset (source)
and epoch, so the stages below serve both. Tar members are read with tarfile from the exact byte range of one
record and decoded only by loader.format.decode_block (whitelisted .npy members, allow_pickle=False); every
record's sequence count is checked against index.json.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass

import numpy as np
import torch

from maskstream.loader import format as fmt
from maskstream.loader import masking
from maskstream.loader.order import RecordTable, in_record_permutation, split_by_worker

MAX_RECORD_BYTES = 256 << 20  # a record larger than this in index.json is refused before any read


# ---- the stages ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dataset:
    """One opened dataset: where its bytes come from, its index.json, fingerprint and record table."""
    root: str
    source: object
    index: dict
    fingerprint: str
    table: RecordTable


def read_records(specs, datasets):
    """Stage: (spec, {(source, record): tar bytes}) per batch; a record of the previous batch is not re-read."""
    cache: dict[tuple, bytes] = {}
    for spec in specs:
        wanted = {(seg.source, seg.record) for seg in spec.segments}
        cache = {k: cache[k] if k in cache else
                 read_record(datasets[k[0]].source, datasets[k[0]].index, datasets[k[0]].table, k[1])
                 for k in wanted}
        yield spec, cache


def read_record(source, index, table, r: int) -> bytes:
    entry = index["shards"][table.shard[r]]
    offset, end = int(table.offset[r]), int(table.end[r])
    if end - offset > MAX_RECORD_BYTES:
        raise fmt.FormatError(f"{entry['name']}: record at offset {offset} spans {end - offset} bytes in "
                              f"index.json, over the {MAX_RECORD_BYTES}-byte limit; the index is not trusted")
    return source.read_range(entry["name"], offset, end, entry["bytes"])


def decode(items, datasets, *, seed: int):
    """Stage: (spec, {(source, epoch, record): (Block, in-record order)}): tar members -> checked arrays."""
    cache: dict[tuple, tuple] = {}
    for spec, raw in items:
        wanted = {(seg.source, seg.epoch, seg.record) for seg in spec.segments}
        cache = {k: cache[k] if k in cache else
                 decode_record(raw[k[0], k[2]], datasets[k[0]].index, datasets[k[0]].table, k[2], seed, k[1])
                 for k in wanted}
        yield spec, cache


def read_record_tar(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """[(key, {suffix: bytes})] of one record's tar bytes, read with tarfile's public API.

    Members group by key (the name before its first dot, as webdataset does); a repeated member is an error.
    """
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, dot, suffix = info.name.partition(".")
            if not dot:
                raise ValueError(f"member {info.name!r} has no suffix")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            if suffix in samples[-1][1]:
                raise ValueError(f"duplicate member {info.name!r}")
            samples[-1][1][suffix] = tar.extractfile(info).read()
    return samples


def decode_record(data: bytes, index: dict, table: RecordTable, r: int, seed: int, epoch: int):
    entry = index["shards"][table.shard[r]]
    where = f"{entry['name']} record at offset {int(table.offset[r])}"
    try:
        samples = read_record_tar(data)
    except (tarfile.TarError, ValueError) as e:  # bad header checksums, duplicate members
        raise fmt.FormatError(f"{where}: unreadable tar data ({e}); the shard is corrupt") from None
    if len(samples) != 1:
        raise fmt.FormatError(f"{where}: expected one record (one tar key), found {len(samples)}; the shard or "
                              f"its index is corrupt")
    members = samples[0][1]
    try:
        block = fmt.decode_block(members, seq_len=index["seq_len"], vocab_size=index["tokenizer"]["vocab_size"],
                                 static_copies=static_copies(index))
    except fmt.FormatError as e:
        raise fmt.FormatError(f"{where}: {e}") from None
    if len(block.uids) != int(table.sequences[r]):
        raise fmt.FormatError(f"{where}: holds {len(block.uids)} sequences, index.json says "
                              f"{int(table.sequences[r])}; the shard is corrupt or truncated")
    return block, in_record_permutation(block.uids, seed=seed, epoch=epoch)


def unbatch(items):
    """Stage: (batch index, Block, rows, segment) pieces, the in-record permuted positions [lo, hi) of each."""
    for spec, blocks in items:
        for seg in spec.segments:
            block, perm = blocks[seg.source, seg.epoch, seg.record]
            yield spec.index, block, perm[seg.lo:seg.hi], seg


def batch(pieces, *, batch_size: int, epoch: int, static_copies: int, mixed: bool = False):
    """Stage: pieces -> one dict of CPU tensors per batch (raw tokens, or stored static masks of copy epoch % K).

    mixed (a mixture): the batch also carries each row's `epochs` (its source's pass) and `sources`.
    """
    parts, segs, current = [], [], None
    for index, block, rows, seg in pieces:
        if current is not None and index != current:
            yield _with_sources(_stack(parts, batch_size, epoch, static_copies), segs, mixed)
            parts, segs = [], []
        current = index
        parts.append((block, rows))
        segs.append((seg, len(rows)))
    if parts:
        yield _with_sources(_stack(parts, batch_size, epoch, static_copies), segs, mixed)


def _with_sources(out: dict, segs, mixed: bool) -> dict:
    if mixed:
        out["epochs"] = torch.tensor([s.epoch for s, n in segs for _ in range(n)], dtype=torch.int64)  # (B,)
        out["sources"] = torch.tensor([s.source for s, n in segs for _ in range(n)], dtype=torch.int64)  # (B,)
    return out


def _stack(parts, batch_size: int, epoch: int, static_copies: int) -> dict:
    cat = lambda f: np.concatenate([f(b)[rows] for b, rows in parts])  # noqa: E731
    out = {"tokens": torch.from_numpy(cat(lambda b: b.tokens).astype(np.int32)),  # (B, L), int64 after masking
           "lengths": torch.from_numpy(cat(lambda b: b.lengths).astype(np.int64)),  # (B,)
           "uids": torch.from_numpy(cat(lambda b: b.uids).view(np.int64))}  # (B,) uint64 bits as int64
    assert len(out["uids"]) == batch_size, (len(out["uids"]), batch_size)
    if static_copies:
        k = epoch % static_copies
        selected = torch.from_numpy(cat(lambda b: b.static_selected[:, k]))  # (B, L) bool
        inputs = torch.from_numpy(cat(lambda b: b.static_inputs[:, k]))  # (B, L) int64
        out["input_ids"], out["labels"] = masking.static_copy(out.pop("tokens"), selected, inputs)
    else:
        out["word_starts"] = torch.from_numpy(cat(lambda b: b.word_starts))  # (B, L) bool
    return out


def finish(raw: dict, *, seed: int, epoch: int, config, vocab, seq_len: int, device) -> dict:
    """The last stage, on the device that trains: mask (dynamic mode) and build the model's batch."""
    raw = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
    if "input_ids" in raw:
        input_ids, labels = raw["input_ids"], raw["labels"]
    else:
        input_ids, labels = masking.mask_batch(raw["tokens"], raw["word_starts"], raw["lengths"], raw["uids"],
                                               seed=seed, epoch=epoch, config=config, vocab=vocab)
    return {"input_ids": input_ids, "labels": labels, "uids": raw["uids"],
            "attention_mask": masking.attention_mask(raw["lengths"], seq_len)}


def static_copies(index: dict) -> int:
    m = index.get("masking", {})
    return int(m.get("static_copies", 0)) if m.get("mode") == "static" else 0


# ---- the dataset that runs the stages in each worker --------------------------------------------------------

class EpochStream(torch.utils.data.IterableDataset):
    """The stages for one (plan, rank, start batch); each DataLoader worker runs its share of the batches."""

    def __init__(self, *, datasets, plan, config, rank: int, masking_config, vocab, epoch: int,
                 start_batch: int, mixed: bool = False):
        self.datasets, self.plan, self.mixed = tuple(datasets), plan, mixed
        self.cfg, self.rank = config, rank
        self.masking, self.vocab, self.seq_len = masking_config, vocab, datasets[0].index["seq_len"]
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        cfg, epoch, copies = self.cfg, self.epoch, static_copies(self.datasets[0].index)
        stages = [
            lambda _: self.plan.specs(self.rank, self.start_batch),
            lambda s: split_by_worker(s, worker, num_workers, self.start_batch),
            lambda s: read_records(s, self.datasets),
            lambda s: decode(s, self.datasets, seed=cfg.seed),
            unbatch,
            lambda s: batch(s, batch_size=cfg.batch_size, epoch=epoch, static_copies=copies, mixed=self.mixed),
        ]
        if cfg.mask_on == "worker":
            stages.append(lambda s: (finish_rows(b, seed=cfg.seed, epoch=epoch, config=self.masking,
                                                 vocab=self.vocab, seq_len=self.seq_len, device="cpu") for b in s))
        stream = None
        for stage in stages:
            stream = stage(stream)
        yield from stream


def finish_rows(raw: dict, *, epoch: int, device, **kw) -> dict:
    """finish(), with a mixture batch's per-row epochs keying its masks and its sources passed through."""
    epochs, sources = raw.pop("epochs", None), raw.pop("sources", None)
    out = finish(raw, epoch=epoch if epochs is None else epochs, device=device, **kw)
    if sources is not None:
        out["sources"] = sources.to(device, non_blocking=True)
    return out


def load_index(source) -> tuple[dict, str]:
    """index.json, validated by loader.format, and its fingerprint (sha256 of its bytes)."""
    data = source.read_index()
    index = fmt.read_index(data, source=f"{getattr(source, 'root', '')}/{fmt.INDEX_FILE}")
    for entry in index["shards"]:
        fmt.check_shard_name(entry["name"])
    return index, hashlib.sha256(data).hexdigest()
