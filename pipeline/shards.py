"""Writing the dataset: shards, rejects and index.json (the record logic of WriteShards and WriteIndex).

Every file is written under a temporary name and renamed when complete, into the run's staging folder
(pipeline/staging.py puts the verified dataset in place). `check_output` refuses an output holding another
dataset or files not a dataset's own (unless --overwrite), and names those files so the swap keeps them.
Local folders use loader.format's ShardWriter.create / write_index; other filesystems (gs://, s3://, fsspec
URLs) stream through pipeline/store.py and rename the same way.
"""
from __future__ import annotations

import collections
import json
import os

import numpy as np

from maskstream.loader import format as fmt
from maskstream.pipeline import store
from maskstream.pipeline.config import data_hash
from maskstream.pipeline.packing import SeqBatch, shard_order
from maskstream.pipeline.pmi import VOCAB_FILE as UNITS_FILE
from maskstream.pipeline.readers import REASONS
from maskstream.pipeline.staging import INNER_STAGING, REMOTE_LOCK
from maskstream.pipeline.store import is_local, join

REJECTS_DIR = "rejects"
REJECTS_FILE = "rejects.jsonl"
TOKENIZER_FILE = "tokenizer.json"


def _write_atomic(path: str, data: bytes) -> None:
    """Write bytes under a temporary name, then move into place (any output filesystem)."""
    store.write_atomic(path, data, temp=path + fmt.PARTIAL_SUFFIX)


def _earlier_index(folder: str) -> dict | None:
    """The index.json an earlier run left, or None when there is none or it does not read (a crashed run)."""
    try:
        index = json.loads(store.read(join(folder, fmt.INDEX_FILE)))
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and isinstance(index.get("config"), dict) else None


def check_output(output: str, config: dict, *, overwrite: bool = False) -> list[str]:
    """The files of OUT that are not the dataset's own (relative paths): kept where they are across the swap.

    Refused unless overwrite: a folder whose index.json records another config (data_hash differs), or one
    holding files that are not a dataset's own (its listed shards, the shards this job writes, index.json,
    tokenizer.json, rejects/rejects.jsonl and their temporary names). Files not a dataset's own are never
    deleted. config: PipelineConfig.to_dict()."""
    from maskstream.errors import UserError
    folder = join(output)
    if is_local(output) and not os.path.isdir(folder):
        return []
    earlier = _earlier_index(folder)
    if earlier is not None and not overwrite:
        try:
            same = data_hash(earlier["config"]) == data_hash(config)
        except (KeyError, TypeError, AttributeError):
            same = False
        if not same:
            raise UserError(f"--output {output} holds another dataset (its index.json records a different "
                            "config); pass a new --output, or --overwrite to replace it")
    shards = {fmt.shard_name(i) for i in range(config["shard"]["num_shards"])}
    if earlier is not None:
        shards |= {e.get("name") for e in earlier.get("shards", []) if isinstance(e, dict)}
    own = {fmt.INDEX_FILE, TOKENIZER_FILE, f"{REJECTS_DIR}/{REJECTS_FILE}", UNITS_FILE, *shards}
    own |= {name + fmt.PARTIAL_SUFFIX for name in own}
    # a staging folder and the lock inside OUT are the run's own (pipeline/staging.py), not foreign files
    foreign = sorted(f for f in store.files(folder)
                     if f not in own and not f.startswith(INNER_STAGING) and f != REMOTE_LOCK)
    if foreign and not overwrite:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(f"--output {output} holds files that are not this dataset's own "
                        f"({', '.join(foreign[:3])}{more}); pass an empty or new --output, or --overwrite "
                        "(they are kept either way)")
    return foreign


def blocks_of(batch: SeqBatch, block_size: int):
    """(tokens, word starts, lengths, uids) slices of at most block_size sequences, in order."""
    for i in range(0, len(batch), block_size):
        yield batch.take(slice(i, i + block_size))


def block_size(seq_len: int, dtype, block_bytes: int) -> int:
    return max(1, block_bytes // (seq_len * np.dtype(dtype).itemsize))


def static_block(seqs: SeqBatch, *, shard_cfg, masking, vocab) -> tuple[np.ndarray, np.ndarray]:
    """(selected (B, K, L) bool, inputs (B, K, L) int64): loader.masking for epochs 0..K-1, torch on CPU.

    masking is MaskingConfig.to_dict(): workers import torch only here, in static mode."""
    import torch

    from maskstream.loader.masking import MaskingConfig, static_masks
    starts = seqs.unit_starts if masking["selection"] == "pmi" else seqs.word_starts
    selected, inputs = static_masks(
        torch.from_numpy(seqs.tokens.astype(np.int64)), torch.from_numpy(starts),
        torch.from_numpy(seqs.lengths.astype(np.int64)), torch.from_numpy(seqs.uids.view(np.int64)),
        seed=shard_cfg.seed, copies=shard_cfg.static_copies, config=MaskingConfig.from_dict(masking),
        vocab=vocab)
    return selected.numpy(), inputs.numpy()


def write_shard(output: str, shard: int, batches: list[SeqBatch], *, shard_cfg, masking, info, seq_len,
                dtype) -> dict:
    """Write one shard (its sequences in uid-hash order, cut into blocks) and return its index entry."""
    seqs = SeqBatch.concat(batches)
    seqs = seqs.take(shard_order(seqs.uids))
    if is_local(output):
        os.makedirs(join(output), exist_ok=True)
        writer = fmt.ShardWriter.create(join(output), shard, vocab_size=info.vocab_size)
        stream = None
    else:
        final = join(output, fmt.shard_name(shard))
        stream = store.create(final + fmt.PARTIAL_SUFFIX)
        writer = fmt.ShardWriter(stream, fmt.shard_name(shard), vocab_size=info.vocab_size)
    for part in blocks_of(seqs, block_size(seq_len, dtype, shard_cfg.block_bytes)):
        block = fmt.Block(tokens=part.tokens, lengths=part.lengths, word_starts=part.word_starts, uids=part.uids,
                          doc_starts=part.doc_starts, unit_starts=part.unit_starts)
        if shard_cfg.masking == "static":
            block.static_selected, block.static_inputs = static_block(part, shard_cfg=shard_cfg, masking=masking,
                                                                      vocab=info.vocab())
        writer.add(block)
    entry = writer.close()
    if stream is not None:
        stream.close()
        store.move(final + fmt.PARTIAL_SUFFIX, final)
    return entry


def write_rejects(output: str, rejects) -> dict:
    """rejects/rejects.jsonl in (source, position) order; returns the count per reason."""
    rejects = sorted(rejects, key=lambda r: (r.source, r.position, r.reason))
    _write_atomic(join(output, REJECTS_DIR, REJECTS_FILE), "".join(r.to_json() + "\n" for r in rejects).encode())
    counts = collections.Counter(r.reason for r in rejects)
    return {reason: counts[reason] for reason in REASONS if counts[reason]}


def sum_stats(dicts) -> dict:
    total = collections.Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


def build_index(*, entries, stats: dict, documents_read: int, rejects_by_reason: dict, config: dict, info,
                inputs, units: dict | None = None) -> dict:
    """The index.json dict; fails (and so writes nothing) unless every document read is accounted for."""
    entries = sorted(entries, key=lambda e: e["name"])
    rejected = sum(rejects_by_reason.values())
    written = stats.get("documents_written", 0)
    if documents_read != written + rejected:
        raise RuntimeError(f"documents lost: read {documents_read} but wrote {written} and rejected {rejected}; "
                           "refusing to write index.json (this is a bug in the pipeline, please report it)")
    sequences = sum(e["sequences"] for e in entries)
    if sequences != stats.get("sequences", 0):
        raise RuntimeError(f"sequences lost: packed {stats.get('sequences', 0)} but shards hold {sequences}")
    counts = dict(stats, documents_read=documents_read, documents_rejected=rejected,
                  rejects_by_reason=rejects_by_reason, sequences=sequences,
                  tokens=sum(e["tokens"] for e in entries), shards=len(entries),
                  empty_shards=config["shard"]["num_shards"] - len(entries))
    return fmt.make_index(
        entries=entries, counts=counts, seq_len=config["pack"]["seq_len"], packing=config["pack"]["packing"],
        tokenizer={**info.to_index(), "file": TOKENIZER_FILE}, masking_mode=config["shard"]["masking"],
        static_copies=config["shard"]["static_copies"], masking_seed=config["shard"]["seed"],
        masking_config=config["masking"], config=config,
        inputs=[{"path": f.path, "key": f.key, "bytes": f.size} for f in inputs],
        rejects=f"{REJECTS_DIR}/{REJECTS_FILE}", **({"units": units} if units else {}))


def write_units(output: str, data: bytes) -> None:
    """The PMI n-gram vocabulary beside index.json (pipeline/pmi.py vocabulary_bytes)."""
    _write_atomic(join(output, UNITS_FILE), data)


def write_tokenizer(output: str, tokenizer_json: str) -> None:
    """A copy of the tokenizer beside the shards, so a dataset is self-contained (training, fill-mask)."""
    _write_atomic(join(output, TOKENIZER_FILE), tokenizer_json.encode())


def write_index(output: str, index: dict) -> None:
    if is_local(output):
        fmt.write_index(join(output), index)
    else:
        fmt.read_index(fmt.dump_index(index))
        _write_atomic(join(output, fmt.INDEX_FILE), fmt.dump_index(index))
