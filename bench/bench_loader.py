"""Loader and masking benchmarks: our loader (dynamic masking, CPU) vs Hugging Face's MLM collator, and the
keyed masking rule alone vs a plain torch.rand masking, on the same real sequences, in the same run.

Sequences: the bundled SOTU corpus tokenized with bert-base-uncased and packed to 128 tokens, written as real
shards with loader.format.ShardWriter (512 sequences per record, each document's start recorded, format v2).
Format v2's costs are measured against their own absence in the same run, interleaved: record checksums on vs
off, and document_ids/position_ids (plus cu_seqlens) on vs off (documents=False gives the v1 loader's batch).
Tokens/s counts B x L positions for every contender, with one intra-op torch thread (see run()). transformers
is needed (`make bench-env`); without it the collator rows are skipped.
"""
from __future__ import annotations

import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maskstream.bench.common import Row, timed
from maskstream.loader import format as fmt
from maskstream.loader import masking, stages
from maskstream.loader.schedule import parse_schedule
from maskstream.loader.stream import LoaderConfig, MLMLoader

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "sotu.jsonl.gz"
TOKENIZER = ROOT / "data" / "tokenizers" / "bert-base-uncased.json"
SEQ_LEN, BATCH, RECORD = 128, 256, 512
VOCAB = masking.Vocab(size=30522, pad_id=0, mask_id=103, special_ids=(0, 100, 101, 102, 103))


def pack_corpus(max_docs: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens (N, L) int64, word_starts (N, L) bool, doc_starts (N, L) bool): [CLS] + 126 tokens + [SEP],
    documents concatenated; doc_starts marks where each document begins inside a row."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(TOKENIZER))
    with gzip.open(CORPUS, "rt") as f:
        texts = [json.loads(line)["text"] for line in f][:max_docs]
    ids, starts, firsts = [], [], []
    for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
        firsts.append(len(ids))
        ids += enc.ids
        starts += [w is not None and (i == 0 or enc.word_ids[i - 1] != w) for i, w in enumerate(enc.word_ids)]
    body = SEQ_LEN - 2
    n = len(ids) // body
    tokens = np.full((n, SEQ_LEN), 102, np.int64)
    tokens[:, 0] = 101
    tokens[:, 1:-1] = np.asarray(ids[:n * body]).reshape(n, body)
    word_starts = np.zeros((n, SEQ_LEN), bool)
    word_starts[:, 1:-1] = np.asarray(starts[:n * body]).reshape(n, body)
    doc_starts = np.zeros((n, SEQ_LEN), bool)
    rows, cols = np.divmod(np.asarray(firsts), body)
    inside = (rows < n) & (cols > 0)  # a document starting a row's body starts the row
    doc_starts[rows[inside], 1 + cols[inside]] = True
    return tokens, word_starts, doc_starts


def write_shards(directory: Path, tokens: np.ndarray, word_starts: np.ndarray, doc_starts: np.ndarray,
                 num_shards: int = 4) -> None:
    n = len(tokens)
    uids = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # distinct, stable
    entries, per_shard = [], -(-n // num_shards)
    for s in range(num_shards):
        writer = fmt.ShardWriter.create(str(directory), s, vocab_size=VOCAB.size)
        for a in range(s * per_shard, min(n, (s + 1) * per_shard), RECORD):
            sl = slice(a, min(a + RECORD, (s + 1) * per_shard, n))
            writer.add(fmt.Block(tokens=tokens[sl].astype(np.uint16), lengths=np.full(sl.stop - a, SEQ_LEN,
                                 np.int32), word_starts=word_starts[sl], uids=uids[sl],
                                 doc_starts=doc_starts[sl]))
        entries.append(writer.close())
    index = fmt.make_index(
        entries=entries, seq_len=SEQ_LEN, packing="full",
        counts={"documents_read": 0, "documents_written": 0, "documents_rejected": 0},
        tokenizer={"sha256": "", "vocab_size": VOCAB.size, "pad_id": 0, "mask_id": 103, "cls_id": 101,
                   "sep_id": 102, "special_ids": list(VOCAB.special_ids), "kind": "wordpiece"},
        masking_config=masking.MaskingConfig().to_dict(), config={"bench": True}, inputs=[str(CORPUS)])
    fmt.write_index(str(directory), index)


def loader_tokens_per_s(root: Path, workers: int, *, schedule: str = "", **options) -> tuple[float, float]:
    """(steady tokens/s after the first batch, seconds to the first batch) over one epoch of MLMLoader with
    masking on the CPU 'device'. The first batch includes starting the worker processes. With `schedule`, the
    rate is set before every batch, as the trainer does (`--mask-schedule`), over the epoch's batches."""
    loader = MLMLoader(str(root), LoaderConfig(batch_size=BATCH, num_workers=workers, pin_memory=False, **options))
    rate = parse_schedule(schedule) if schedule else None
    total = len(loader)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    t0, n = time.perf_counter(), 0
    for step, batch in enumerate(batches, start=1):
        n += batch["input_ids"].numel()
        if rate is not None:
            loader.set_mask_rate(rate(step, total))
    return n / (time.perf_counter() - t0), t0 - start


# name -> LoaderConfig options; "v1 batch" is the anchor of the document fields, "checks off" of the checksums
V2_VARIANTS = {"v2 default": {}, "checks off": {"check_records": False}, "v1 batch": {"documents": False},
               "varlen": {"varlen": True}, "schedule": {"schedule": "linear:0.3:0.15"}}


def format_v2_rows(root: Path, repeat: int) -> list[Row]:
    """Format v2's costs in one process (workers=0, where every cost shows): the variants interleaved `repeat`
    times so drifts of a shared machine hit each alike; medians compared."""
    runs = {name: [] for name in V2_VARIANTS}
    for _ in range(repeat):
        for name, options in V2_VARIANTS.items():
            runs[name].append(loader_tokens_per_s(root, 0, **options)[0])
    speed = {name: statistics.median(v) for name, v in runs.items()}
    print("format v2, workers=0, median of " + str(repeat) + ": " +
          ", ".join(f"{name} {v / 1e6:.2f}M tok/s" for name, v in speed.items()))
    default = speed["v2 default"]
    print_v2_costs(root, per_batch_s=BATCH * SEQ_LEN / speed["v1 batch"])
    return [Row(area="loader", name="record checksums on (default) vs off", value=default, unit="tokens/s",
                anchor="checks off", anchor_value=speed["checks off"], target=">= 0.95x"),
            Row(area="loader", name="document ids on (default) vs v1 batch", value=default, unit="tokens/s",
                anchor="documents=False", anchor_value=speed["v1 batch"], target=">= 0.9x"),
            Row(area="loader", name="varlen (cu_seqlens) vs v1 batch", value=speed["varlen"], unit="tokens/s",
                anchor="documents=False", anchor_value=speed["v1 batch"], target=">= 0.9x"),
            Row(area="loader", name="mask-rate schedule linear:0.3:0.15, document ids on, vs v1 batch",
                value=speed["schedule"], unit="tokens/s", anchor="documents=False, dataset's rate",
                anchor_value=speed["v1 batch"], target=">= 0.9x")]


def print_v2_costs(root: Path, per_batch_s: float) -> None:
    """The same costs timed alone (less noisy than whole epochs): one record's checksum, one batch's document
    fields and varlen fields, as shares of a batch's time in the v1-batch loader."""
    index = fmt.read_index((root / fmt.INDEX_FILE).read_bytes())
    entry = index["shards"][0]
    record = (root / entry["name"]).read_bytes()[entry["records"][0][0]:entry["records"][1][0]]
    per_record = -(-entry["records"][0][1] // BATCH)  # batches one record feeds
    _, _, doc_starts = pack_corpus(40)
    starts, lengths = doc_starts[:BATCH], np.full(BATCH, SEQ_LEN)
    costs = {"record checksum": timed(lambda: fmt.record_checksum(record), repeat=50) / per_record,
             "document_fields": timed(lambda: stages.document_fields(starts, lengths), repeat=50),
             "varlen_fields": timed(lambda: stages.varlen_fields(starts, lengths), repeat=50)}
    print("format v2 costs per batch: " + ", ".join(f"{k} {v * 1e6:.0f} us ({v / per_batch_s:.1%})"
                                                     for k, v in costs.items()))


def plain_rand_masking(tokens: torch.Tensor, special: torch.Tensor, p: float = 0.15):
    """The anchor: one torch.rand draw, partitioned into select / [MASK] (80 %) / random (10 %) / keep."""
    r = torch.rand(tokens.shape)
    selected = (r < p) & ~torch.isin(tokens, special)
    inputs = torch.where(selected & (r < 0.8 * p), torch.full_like(tokens, VOCAB.mask_id), tokens)
    randomize = selected & (r >= 0.8 * p) & (r < 0.9 * p)
    inputs = torch.where(randomize, torch.randint(VOCAB.size, tokens.shape), inputs)
    return inputs, torch.where(selected, tokens, torch.full_like(tokens, -100))


def collator_rows(tokens: np.ndarray, best_loader: float) -> list[Row]:
    try:
        from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast
    except ImportError:
        print("transformers not installed (make bench-env): skipping the collator anchor")
        return []
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), mask_token="[MASK]", pad_token="[PAD]",
                                     cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]")
    collator = DataCollatorForLanguageModeling(hf_tok, mlm_probability=0.15, return_tensors="pt")
    as_lists = [{"input_ids": row.tolist()} for row in tokens[:BATCH]]
    as_tensors = [torch.from_numpy(row) for row in tokens[:BATCH]]
    per_batch = BATCH * SEQ_LEN
    lists = per_batch / timed(lambda: collator(as_lists), repeat=5)
    tensors = per_batch / timed(lambda: collator(as_tensors), repeat=5)
    print(f"HF DataCollatorForLanguageModeling: fed lists {lists / 1e6:.2f}M tok/s, fed tensors "
          f"{tensors / 1e6:.2f}M tok/s")
    return [Row(area="loader", name="best loader vs HF collator fed lists", value=best_loader,
                unit="tokens/s", anchor="HF collator (lists)", anchor_value=lists, target=">= 10x"),
            Row(area="loader", name="best loader vs HF collator fed tensors", value=best_loader,
                unit="tokens/s", anchor="HF collator (tensors)", anchor_value=tensors, target="")]


def run(args, body=None) -> list[Row]:
    # NOTE: every contender runs with one intra-op thread. On a small shared machine, torch's OpenMP threads
    # spin-wait for busy cores: mask_batch measured 84 ms per batch with 2 threads vs 4 ms with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return (body or _run)(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> list[Row]:
    quick = getattr(args, "quick", False)
    workdir = Path(args.workdir) if getattr(args, "workdir", None) else Path(tempfile.mkdtemp(prefix="ms-bench-"))
    root = workdir / "loader-shards"
    root.mkdir(parents=True, exist_ok=True)
    tokens, word_starts, doc_starts = pack_corpus(40 if quick else None)
    write_shards(root, tokens, word_starts, doc_starts)
    print(f"{len(tokens):,} sequences of {SEQ_LEN} ({tokens.size / 1e6:.2f}M positions) in {root}")

    rows, speeds = [], {}
    for workers in (0, 1, 2):
        speeds[workers], first = loader_tokens_per_s(root, workers)
        print(f"MLMLoader, dynamic masking on CPU, batch {BATCH}, workers={workers}: "
              f"{speeds[workers] / 1e6:.2f}M tokens/s after the first batch ({first:.2f} s to it)")
        rows.append(Row(area="loader", name=f"MLMLoader tokens/s, CPU masking, workers={workers}",
                        value=speeds[workers], unit="tokens/s"))
    rows += collator_rows(tokens, max(speeds.values()))
    rows += format_v2_rows(root, repeat=3 if quick else 5)

    t = torch.from_numpy(tokens[:BATCH])
    ws = torch.from_numpy(word_starts[:BATCH])
    lengths = torch.full((BATCH,), SEQ_LEN)
    uids = torch.arange(BATCH, dtype=torch.int64)
    special = torch.tensor(VOCAB.special_ids)
    config = masking.MaskingConfig()
    keyed = t.numel() / timed(lambda: masking.mask_batch(t, ws, lengths, uids, seed=0, epoch=1, config=config,
                                                         vocab=VOCAB), repeat=10)
    plain = t.numel() / timed(lambda: plain_rand_masking(t, special), repeat=10)
    print(f"masking a {BATCH}x{SEQ_LEN} batch on CPU: keyed mask_batch {keyed / 1e6:.2f}M tok/s, "
          f"plain torch.rand {plain / 1e6:.2f}M tok/s")
    rows.append(Row(area="masking", name="mask_batch (keyed, exact count) tokens/s", value=keyed,
                    unit="tokens/s", anchor="plain torch.rand masking", anchor_value=plain, target=">= 0.5x"))
    return rows
