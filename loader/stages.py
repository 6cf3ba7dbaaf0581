"""The loader's stages: small generator functions (iterator in, iterator out), webdataset style.

Run inside each DataLoader worker, in this order (EpochStream wires them; loader/stream.py drives them):

    plan.specs (this rank's batches)  -> split_by_worker -> read_records -> decode
    -> unbatch (in-record permutation) -> batch -> [finish: mask, when mask_on="worker"]

and `finish` runs last, on the training device, for mask_on="device". The plan is an order.EpochPlan (one
dataset) or a mixture.MixEpoch (several); either yields BatchSpecs whose segments name their dataset (source)
and epoch, so the stages below serve both. Tar members are read with tarfile from the exact byte range of one
record, its checksum compared with index.json's first (format v2), and decoded only by
loader.format.decode_block (whitelisted .npy members, headers checked before reading, nothing unpickled);
every record's sequence count is checked against index.json.

Batches carry document_ids (B, L) int32 (0 for a row's first document, +1 at each document start inside the
row, -1 on padding) and position_ids (B, L) int64 (0 at each document start, then counting on; padding continues
its row's last document). With LoaderConfig(varlen=True) also cu_seqlens (S+1,) int32 and max_seqlen (int):
segments of the flattened (B*L) batch, one per document of each row and one per row's padding, so a varlen
kernel runs on the padded batch reshaped to (B*L, ...) as it is; cu_seqlens[-1] == B*L.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
import warnings
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


def read_records(specs, datasets, *, check: bool = True):
    """Stage: (spec, {(source, record): tar bytes}) per batch; a record of the previous batch is not re-read."""
    cache: dict[tuple, bytes] = {}
    for spec in specs:
        wanted = {(seg.source, seg.record) for seg in spec.segments}
        cache = {k: cache[k] if k in cache else
                 read_record(datasets[k[0]].source, datasets[k[0]].index, datasets[k[0]].table, k[1], check=check)
                 for k in wanted}
        yield spec, cache


def record_place(index: dict, table: RecordTable, r: int) -> tuple[dict, int, str]:
    """(shard entry, the record's number inside its shard, 'shard-….tar record i at offset o') of record r."""
    s = int(table.shard[r])
    i = r - int(np.searchsorted(table.shard, s))  # RecordTable lists records in index.json order
    entry = index["shards"][s]
    return entry, i, f"{entry['name']} record {i} at offset {int(table.offset[r])}"


def read_record(source, index, table, r: int, *, check: bool = True) -> bytes:
    """The tar bytes of record r, their size bounded before the read and (format v2, `check`) their checksum
    compared with index.json's after it, before anything is decoded."""
    entry, i, where = record_place(index, table, r)
    offset, end = int(table.offset[r]), int(table.end[r])
    if end - offset > MAX_RECORD_BYTES:
        raise fmt.FormatError(f"{where} spans {end - offset} bytes in index.json, over the {MAX_RECORD_BYTES}-"
                              f"byte limit; the index is not trusted")
    data = source.read_range(entry["name"], offset, end, entry["bytes"])
    if check and "checksums" in entry and fmt.record_checksum(data) != entry["checksums"][i]:
        raise fmt.FormatError(f"{where}: {fmt.CHECKSUM} {fmt.record_checksum(data)} but index.json says "
                              f"{entry['checksums'][i]}; the shard changed after it was written: copy it "
                              f"again or rerun `maskstream preprocess`")
    return data


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
            if info.size > min(len(data), fmt.MAX_MEMBER_BYTES):  # checked before its bytes are taken
                raise ValueError(f"member {info.name!r} claims {info.size} bytes in a record of {len(data)}")
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
    _, _, where = record_place(index, table, r)
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
                                 static_copies=static_copies(index), sequences=int(table.sequences[r]))
    except fmt.FormatError as e:
        raise fmt.FormatError(f"{where}: {e}") from None
    return block, in_record_permutation(block.uids, seed=seed, epoch=epoch)


def unbatch(items):
    """Stage: (batch index, Block, rows, segment) pieces, the in-record permuted positions [lo, hi) of each."""
    for spec, blocks in items:
        for seg in spec.segments:
            block, perm = blocks[seg.source, seg.epoch, seg.record]
            yield spec.index, block, perm[seg.lo:seg.hi], seg


def batch(pieces, *, batch_size: int, epoch: int, static_copies: int, documents: bool = True,
          varlen: bool = False, mixed: bool = False):
    """Stage: pieces -> one dict of CPU tensors per batch (raw tokens, or stored static masks of copy epoch % K),
    with the document fields (see the module docstring) unless `documents` is False.

    mixed (a mixture): the batch also carries each row's `epochs` (its source's pass) and `sources`.
    """
    parts, segs, current = [], [], None
    for index, block, rows, seg in pieces:
        if current is not None and index != current:
            yield _with_sources(_stack(parts, batch_size, epoch, static_copies, documents, varlen), segs, mixed)
            parts, segs = [], []
        current = index
        parts.append((block, rows))
        segs.append((seg, len(rows)))
    if parts:
        yield _with_sources(_stack(parts, batch_size, epoch, static_copies, documents, varlen), segs, mixed)


def _with_sources(out: dict, segs, mixed: bool) -> dict:
    if mixed:
        out["epochs"] = torch.tensor([s.epoch for s, n in segs for _ in range(n)], dtype=torch.int64)  # (B,)
        out["sources"] = torch.tensor([s.source for s, n in segs for _ in range(n)], dtype=torch.int64)  # (B,)
    return out


def document_fields(doc_starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(document_ids (B, L) int32, position_ids (B, L) int64) from document starts inside rows (B, L) bool."""
    B, L = doc_starts.shape
    col = np.arange(L)
    ids, positions = np.zeros((B, L), np.int32), np.tile(col, (B, 1))
    # NOTE: only rows holding a start or padding are touched: in full packing they are a few percent
    rows = np.flatnonzero(doc_starts.any(axis=1))
    if len(rows):
        starts = doc_starts[rows]
        ids[rows] = np.cumsum(starts, axis=1, dtype=np.int32)
        positions[rows] = col - np.maximum.accumulate(np.where(starts, col, 0), axis=1)
    short = np.flatnonzero(lengths < L)
    if len(short):
        ids[short] = np.where(col >= lengths[short, None], -1, ids[short])
    return ids, positions


def varlen_fields(doc_starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """(cu_seqlens (S+1,) int32, max_seqlen) of the flattened (B*L) batch: a segment per document of each row
    and one per row's padding; cu_seqlens[-1] == B * L."""
    B, L = doc_starts.shape
    short = np.flatnonzero(lengths < L)
    cu = np.concatenate([np.arange(B + 1) * L, np.flatnonzero(doc_starts), short * L + lengths[short]])
    cu = np.sort(cu).astype(np.int32)
    return cu, int(np.diff(cu).max())


def _stack(parts, batch_size: int, epoch: int, static_copies: int, documents: bool, varlen: bool) -> dict:
    cat = lambda f: np.concatenate([f(b)[rows] for b, rows in parts])  # noqa: E731
    out = {"tokens": torch.from_numpy(cat(lambda b: b.tokens).astype(np.int32)),  # (B, L), int64 after masking
           "lengths": torch.from_numpy(cat(lambda b: b.lengths).astype(np.int64)),  # (B,)
           "uids": torch.from_numpy(cat(lambda b: b.uids).view(np.int64))}  # (B,) uint64 bits as int64
    assert len(out["uids"]) == batch_size, (len(out["uids"]), batch_size)
    if documents:
        starts, lengths = cat(lambda b: b.doc_starts), out["lengths"].numpy()
        ids, positions = document_fields(starts, lengths)
        out["document_ids"], out["position_ids"] = torch.from_numpy(ids), torch.from_numpy(positions)
        if varlen:
            cu, out["max_seqlen"] = varlen_fields(starts, lengths)
            out["cu_seqlens"] = torch.from_numpy(cu)
    if static_copies:
        k = epoch % static_copies
        selected = torch.from_numpy(cat(lambda b: b.static_selected[:, k]))  # (B, L) bool
        inputs = torch.from_numpy(cat(lambda b: b.static_inputs[:, k]))  # (B, L) int64
        out["input_ids"], out["labels"] = masking.static_copy(out.pop("tokens"), selected, inputs)
    else:
        out["word_starts"] = torch.from_numpy(cat(lambda b: b.word_starts))  # (B, L) bool
        if all(b.unit_starts is not None for b, _ in parts):  # datasets made with --selection pmi (a mixture: all)
            out["unit_starts"] = torch.from_numpy(cat(lambda b: b.unit_starts))  # (B, L) bool
    return out


def finish(raw: dict, *, seed: int, epoch: int, config, vocab, seq_len: int, device, rate=None) -> dict:
    """The last stage, on the device that trains: mask (dynamic mode, at `rate` when a schedule gives one) and
    build the model's batch."""
    raw = {k: to_device(v, device) for k, v in raw.items()}
    if "input_ids" in raw:
        input_ids, labels = raw["input_ids"], raw["labels"]
    else:
        starts = raw["unit_starts"] if config.selection == "pmi" else raw["word_starts"]
        input_ids, labels = masking.mask_batch(raw["tokens"], starts, raw["lengths"], raw["uids"],
                                               seed=seed, epoch=epoch, config=config, vocab=vocab, rate=rate)
    return {"input_ids": input_ids, "labels": labels, "uids": raw["uids"],
            "attention_mask": masking.attention_mask(raw["lengths"], seq_len),
            **{k: raw[k] for k in DOCUMENT_KEYS if k in raw}}


DOCUMENT_KEYS = ("document_ids", "position_ids", "cu_seqlens", "max_seqlen")


def to_device(value, device):
    """A batch value on `device`: tensors move (non-blocking), plain numbers (max_seqlen) stay as they are."""
    return value.to(device, non_blocking=True) if torch.is_tensor(value) else value


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
            lambda s: read_records(s, self.datasets, check=cfg.check_records),
            lambda s: decode(s, self.datasets, seed=cfg.seed),
            unbatch,
            lambda s: batch(s, batch_size=cfg.batch_size, epoch=epoch, static_copies=copies,
                            documents=cfg.documents, varlen=cfg.varlen, mixed=self.mixed),
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
    where = f"{getattr(source, 'root', '')}/{fmt.INDEX_FILE}"
    index = fmt.read_index(data, source=where)
    if index["format_version"] < 2:
        warnings.warn(f"{where}: format v{index['format_version']} dataset: its records carry no checksums, so "
                      f"corruption is not caught while streaming (`maskstream inspect --verify` checks sha256), "
                      f"and each sequence counts as one document; rerun `maskstream preprocess` for format "
                      f"v{fmt.FORMAT_VERSION}", fmt.OldFormatWarning, stacklevel=3)
    return index, hashlib.sha256(data).hexdigest()
