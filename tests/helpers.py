"""Helpers shared by every test folder: the bundled data, SOTU readers, free ports, and tiny real datasets.

Imported as `helpers` (pytest's `pythonpath = ["tests"]`, see pyproject.toml). The datasets are SOTU text
tokenized with BERT's WordPiece and written with loader.format.ShardWriter + write_index directly (not through
Beam), so loader and trainer tests stay fast and independent of the pipeline.
`build_dataset(dir, [[64, 64, 30], [17]])` writes two shards with records of those sequence counts: uneven
shards on demand.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import socket
import tarfile
from pathlib import Path

import numpy as np
import torch

from maskstream.loader import format as fmt
from maskstream.loader import masking

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"      # see data/README.md for each file's source and license
TOKENIZER = DATA / "tokenizers" / "bert-base-uncased.json"
SOTU = DATA / "sotu.jsonl.gz"
SEQ_LEN = 128
VOCAB = masking.Vocab(size=30522, pad_id=0, mask_id=103, special_ids=(0, 100, 101, 102, 103))
CLS, SEP = 101, 102


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sotu_lines(n: int | None = None):
    """The first n JSONL lines of the SOTU corpus (all of them without n), newline included."""
    with gzip.open(SOTU, "rt") as f:
        for i, line in enumerate(f):
            if n is not None and i == n:
                return
            yield line


def write_sotu_subset(path, n: int) -> Path:
    """The first n SOTU addresses as plain JSONL at path; returns it."""
    path = Path(path)
    path.write_text("".join(sotu_lines(n)))
    return path


def sotu_texts(max_chars: int | None = None) -> list[str]:
    """The SOTU addresses' texts, in order; with max_chars, stop after the first text that passes it."""
    texts, total = [], 0
    for line in sotu_lines():
        texts.append(json.loads(line)["text"])
        total += len(texts[-1])
        if max_chars is not None and total > max_chars:
            break
    return texts


def changed(text: str, fraction: float, seed: int) -> str:
    """text with `fraction` of its words replaced (a near copy)."""
    words = text.split()
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(words), max(1, int(fraction * len(words))), replace=False):
        words[i] = f"w{seed}x{i}"
    return " ".join(words)


@functools.lru_cache(maxsize=None)
def sotu_sequences(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first n packed sequences of the SOTU corpus: tokens (n, L) int64, lengths, word starts, uids.

    [CLS] + up to L-2 tokens + [SEP]; every 7th sequence is shortened so padding occurs.
    """
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(TOKENIZER))
    ids, starts = [], []
    for line in sotu_lines():
        enc = tok.encode(json.loads(line)["text"], add_special_tokens=False)
        words = enc.word_ids
        ids += enc.ids
        starts += [w is not None and (i == 0 or words[i - 1] != w) for i, w in enumerate(words)]
        if len(ids) >= n * (SEQ_LEN - 2):
            break
    body = SEQ_LEN - 2
    tokens = np.zeros((n, SEQ_LEN), np.int64)
    word_starts = np.zeros((n, SEQ_LEN), bool)
    lengths = np.full(n, SEQ_LEN, np.int32)
    for i in range(n):
        k = body if i % 7 else body - 1 - (i * 37) % 90
        tokens[i, 0], tokens[i, 1:k + 1], tokens[i, k + 1] = CLS, ids[i * body:i * body + k], SEP
        word_starts[i, 1:k + 1] = starts[i * body:i * body + k]
        lengths[i] = k + 2
    uids = np.array([int.from_bytes(hashlib.sha256(f"sotu:{i}".encode()).digest()[:8], "little")
                     for i in range(n)], dtype=np.uint64)
    return tokens, lengths, word_starts, uids


def build_dataset(directory, shards: list[list[int]], *, static_copies: int = 0, seed: int = 7,
                  config: masking.MaskingConfig | None = None) -> Path:
    """Write shards with these record sizes (sequences per record) and index.json; returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = config or masking.MaskingConfig()
    total = sum(sum(s) for s in shards)
    tokens, lengths, word_starts, uids = sotu_sequences(total)
    entries, pos = [], 0
    for i, records in enumerate(shards):
        writer = fmt.ShardWriter.create(str(directory), i, vocab_size=VOCAB.size)
        for n in records:
            sl = slice(pos, pos + n)
            block = fmt.Block(tokens=tokens[sl].astype(np.uint16), lengths=lengths[sl],
                              word_starts=word_starts[sl], uids=uids[sl])
            if static_copies:
                sel, inp = masking.static_masks(torch.from_numpy(tokens[sl]), torch.from_numpy(word_starts[sl]),
                                                torch.from_numpy(lengths[sl]),
                                                torch.from_numpy(uids[sl].view(np.int64)), seed=seed,
                                                copies=static_copies, config=config, vocab=VOCAB)
                block.static_selected, block.static_inputs = sel.numpy(), inp.numpy()
            writer.add(block)
            pos += n
        entries.append(writer.close())
    write_index(directory, entries, static_copies=static_copies, seed=seed, config=config)
    return directory


def write_index(directory, entries: list[dict], *, static_copies=0, seed=7, config=None) -> dict:
    config = config or masking.MaskingConfig()
    index = fmt.make_index(
        entries=entries, seq_len=SEQ_LEN, packing="full",
        counts={"documents_read": 1, "documents_written": 1, "documents_rejected": 0, "rejects_by_reason": {},
                "tail_sequences": 0},
        tokenizer={"sha256": "test", "vocab_size": VOCAB.size, "pad_id": 0, "mask_id": 103, "cls_id": CLS,
                   "sep_id": SEP, "special_ids": list(VOCAB.special_ids), "kind": "wordpiece"},
        masking_mode="static" if static_copies else "dynamic", static_copies=static_copies, masking_seed=seed,
        masking_config=config.to_dict(), config={"test": True}, inputs=["sotu.jsonl.gz"])
    fmt.write_index(str(directory), index)
    return index


def read_tar(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def rewrite_shard(directory, i: int, members: list[tuple[str, bytes]]) -> None:
    """Rewrite shard i from (name, bytes) members, updating its index entry (offsets, bytes, sha256, record
    checksums), so what the test forged is what the reader meets after every checksum passes."""
    directory = Path(directory)
    index = json.loads((directory / fmt.INDEX_FILE).read_text())
    entry = index["shards"][i]
    buf = io.BytesIO()
    offsets = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            offsets.setdefault(name.split(".")[0], t.offset)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    (directory / entry["name"]).write_bytes(data)
    entry["records"] = [[offsets[f"{r:06d}"], n] for r, (_, n) in enumerate(entry["records"])]
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    ends = [o for o, _ in entry["records"][1:]] + [len(data)]
    entry["checksums"] = [fmt.record_checksum(data[o:e]) for (o, _), e in zip(entry["records"], ends, strict=True)]
    fmt.write_index(str(directory), index)


def collect(loader, *, limit=None) -> list[dict]:
    """The loader's batches as CPU tensors (a whole epoch, or the first `limit`)."""
    out = []
    for batch in loader:
        out.append({k: v.cpu() if hasattr(v, "cpu") else v for k, v in batch.items()})  # max_seqlen: an int
        if limit is not None and len(out) == limit:
            break
    return out


def dataset_uids(root) -> list[int]:
    """Every uid stored in the dataset's shards, read straight from the tar files (int64 bit patterns)."""
    index = json.loads((Path(root) / fmt.INDEX_FILE).read_text())
    return [int(u) for e in index["shards"] for name, data in read_tar(Path(root) / e["name"])
            if name.endswith(".uids.npy") for u in np.load(io.BytesIO(data)).view(np.int64)]


def read_sequences(root, index: dict | None = None) -> dict:
    """Every sequence of a dataset, by uid, decoded with the reader's own format module:
    uid -> (tokens int64, word starts, length, static selected or None, static inputs or None)."""
    import webdataset as wds
    root = Path(root)
    index = index or fmt.read_index((root / fmt.INDEX_FILE).read_bytes())
    rows = {}
    for shard in index["shards"]:
        for sample in wds.WebDataset(str(root / shard["name"]), shardshuffle=False):
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            block = fmt.decode_block(members, seq_len=index["seq_len"], vocab_size=index["tokenizer"]["vocab_size"],
                                     static_copies=index["masking"]["static_copies"])
            for i, uid in enumerate(block.uids.tolist()):
                rows[uid] = (block.tokens[i].astype(np.int64), block.word_starts[i], int(block.lengths[i]),
                             None if block.static_selected is None else block.static_selected[i],
                             None if block.static_inputs is None else block.static_inputs[i])
    return rows
