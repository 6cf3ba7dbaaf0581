"""The peer loaders' side of `make bench-peers`, run by .venv-peers' python.

    python bench/peers_worker.py convert --tokens tokens.npy --out DIR --json out.json  # DIR/mds, DIR/litdata
    python bench/peers_worker.py serve --peer mosaic --data DIR --tokenizer bert.json ...  # JSON lines in/out

`convert` writes the exported sequences as mosaicml-streaming MDS shards (one fixed-shape `ndarray:uint16`
column) and as litdata's optimized chunks (`litdata.optimize` with `TokensLoader`, the layout litdata's
pretraining recipes use), then reads both back unshuffled and refuses to go on unless each holds exactly the
sequences of tokens.npy, in order. `serve` measures one peer the way its users feed a masked-LM model: the
peer's `StreamingDataset` (shuffled) yields int64 token tensors, a torch DataLoader batches them with Hugging
Face's `DataCollatorForLanguageModeling`, and the figure is tokens/s (B x L positions) over a fixed number of
batches after warm-up batches (measure(), which bench_peers.py also times our loader with). The peers' imports
stay inside functions: their pins conflict with ours (mosaicml-streaming 0.13 needs numpy < 2.2 and
transformers < 5), so they exist only in their own venv; at the top, only numpy and torch.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

SPECIALS = {"mask_token": "[MASK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
            "unk_token": "[UNK]"}
MDS_SHARD_BYTES = 1 << 20   # 5 MDS shards for SOTU; our job writes 4
LIT_CHUNK_SEQUENCES = 4096  # litdata chunks of 4096 whole sequences (TokensLoader blocks never straddle them)


# NOTE: PyPI's torchvision 0.28.0 (the release for torch 2.13.0) is a CUDA build: beside the CPU torch wheel its C
# ops do not load, and it then fails to import ("operator torchvision::nms does not exist"): two of its fake-kernel
# registrations are unguarded. `import streaming` imports torchvision (streaming.vision), though neither peer calls
# a torchvision op on token data. So, only for that release and only when its ops did not load, the two schemas are
# declared (no kernels: a call would fail loudly) before mosaic is imported; the process ends with the benchmark.
TORCHVISION_SEEN = "0.28.0"
_TORCHVISION_FAKE_OPS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                         "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
_declared = []


def import_mosaic():
    """`streaming`, importable beside the CPU torch wheel (see the note above)."""
    import importlib.metadata
    import importlib.util
    if not _declared and importlib.metadata.version("torchvision") == TORCHVISION_SEEN:
        ops = Path(importlib.util.find_spec("torchvision").origin).with_name("_C.so")
        try:
            torch.ops.load_library(str(ops))
        except OSError:  # a CUDA build beside CPU torch: declare what the unguarded registrations need
            lib = torch.library.Library("torchvision", "DEF")
            for schema in _TORCHVISION_FAKE_OPS:
                lib.define(schema)
            _declared.append(lib)  # the declarations live as long as the Library object
    import streaming
    return streaming


# ---- convert: tokens.npy -> MDS and litdata, checked ----------------------------------------------------------

def write_mds(tokens: np.ndarray, out: Path) -> None:
    MDSWriter = import_mosaic().MDSWriter
    column = f"ndarray:uint16:{tokens.shape[1]}"  # fixed shape: no per-sample header
    with MDSWriter(out=str(out), columns={"input_ids": column}, compression=None,
                   size_limit=MDS_SHARD_BYTES, progress_bar=False) as writer:
        for row in tokens:
            writer.write({"input_ids": row})


def _litdata_items(spec):
    """litdata.optimize's fn (module level, so it pickles): the whole sequences of rows [lo, hi), in order."""
    path, lo, hi = spec
    rows = np.load(path, mmap_mode="r")[lo:hi]
    for row in rows:
        yield torch.from_numpy(row.astype(np.uint16))


def write_litdata(tokens_path: Path, n: int, seq_len: int, out: Path) -> None:
    import litdata
    spans = [(str(tokens_path), lo, min(n, lo + LIT_CHUNK_SEQUENCES)) for lo in range(0, n, LIT_CHUNK_SEQUENCES)]
    litdata.optimize(fn=_litdata_items, inputs=spans, output_dir=str(out),
                     chunk_size=LIT_CHUNK_SEQUENCES * seq_len, item_loader=litdata.TokensLoader(),
                     num_workers=1, mode="overwrite")


def mosaic_dataset(root: Path, *, shuffle: bool, batch_size: int):
    """The peer's dataset the way llm-foundry's text dataset reads tokens: one int64 tensor per sample."""
    streaming = import_mosaic()
    from streaming.base.util import clean_stale_shared_memory
    clean_stale_shared_memory()  # a previous run's leftovers would make this one refuse the folder

    class MosaicTokens(streaming.StreamingDataset):
        def __getitem__(self, i):
            return torch.from_numpy(super().__getitem__(i)["input_ids"].astype(np.int64))

    return MosaicTokens(local=str(root / "mds"), shuffle=shuffle, shuffle_seed=0, batch_size=batch_size)


def litdata_dataset(root: Path, *, shuffle: bool, batch_size: int, seq_len: int):
    import litdata

    class LitTokens(litdata.StreamingDataset):
        def __getitem__(self, i):
            return super().__getitem__(i).to(torch.int64)

    return LitTokens(str(root / "litdata"), item_loader=litdata.TokensLoader(block_size=seq_len), shuffle=shuffle,
                     seed=0)


def read_back(peer: str, root: Path, seq_len: int) -> np.ndarray:
    """Every sequence of the peer's copy, unshuffled, one process: (N, L) int64."""
    ds = (mosaic_dataset(root, shuffle=False, batch_size=1) if peer == "mosaic"
          else litdata_dataset(root, shuffle=False, batch_size=1, seq_len=seq_len))
    rows = [item.numpy() for item in ds]
    return np.stack(rows) if rows else np.zeros((0, seq_len), np.int64)


def convert(args) -> dict:
    tokens = np.load(args.tokens)  # (N, L) uint16, our shards' sequences in record order
    n, seq_len = tokens.shape
    out = Path(args.out)
    seconds = {}
    t0 = time.perf_counter()
    write_mds(tokens, out / "mds")
    seconds["mosaic"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_litdata(Path(args.tokens), n, seq_len, out / "litdata")
    seconds["litdata"] = time.perf_counter() - t0
    for peer in ("mosaic", "litdata"):
        back = read_back(peer, out, seq_len)
        if back.shape != tokens.shape or not np.array_equal(back, tokens):
            raise SystemExit(f"{peer}: read back {back.shape} sequences that differ from {args.tokens} "
                             f"{tokens.shape}; the conversion is wrong, no figure would be comparable")
    return {"sequences": n, "seq_len": seq_len, "convert_s": seconds, "checked": True}


# ---- serve: one peer, imported once, timed on request -------------------------------------------------------

def hf_collator(tokenizer_file: str, mlm_probability: float):
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, **SPECIALS)
    return DataCollatorForLanguageModeling(tok, mlm_probability=mlm_probability, return_tensors="pt")


def stack(items: list) -> dict:
    """The unmasked anchor: the peer's sequences batched, nothing else (what the collator's time is beside)."""
    return {"input_ids": torch.stack(items)}


def serve(args) -> None:
    """Import the peer and build HF's collator once, then answer JSON lines on stdin, one per line on stdout:
    {"workers": W, "warmup": N, "batches": M, "masked": true} -> measure()'s dict. Each request builds the peer's
    dataset (untimed) and iterates a new DataLoader over it, as a fresh training process would. Everything the
    libraries print goes to stderr: stdout carries only the answers."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    torch.set_num_threads(1)  # the same setting as our side (see bench/bench_loader.py run())
    t0 = time.perf_counter()
    root = Path(args.data)
    if args.peer == "mosaic":
        import_mosaic()
    else:
        import litdata  # noqa: F401
    collate = hf_collator(args.tokenizer, args.mlm_probability)
    answers.write(json.dumps({"ready_s": time.perf_counter() - t0}) + "\n")
    for line in sys.stdin:
        ask = json.loads(line)
        # NOTE: a new dataset each time: mosaic's file locks, once used in this process, refuse to be inherited
        # by the next DataLoader's forked workers
        ds = (mosaic_dataset(root, shuffle=True, batch_size=args.batch) if args.peer == "mosaic"
              else litdata_dataset(root, shuffle=True, batch_size=args.batch, seq_len=args.seq_len))
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=ask["workers"], drop_last=True,
                                             collate_fn=collate if ask["masked"] else stack)
        batches = iter(loader)
        result = measure(batches, warmup=ask["warmup"], batches_timed=ask["batches"])
        del batches, loader, ds  # its workers and shared memory go before the next request
        gc.collect()
        answers.write(json.dumps({"peer": args.peer, **ask, **result}) + "\n")


def measure(batches, *, warmup: int, batches_timed: int) -> dict:
    """Tokens/s (B x L positions) over `batches_timed` batches after `warmup` batches, tokens per CPU second of
    this process, and the share of positions masked. The one timing rule of `make bench-peers`: bench_peers.py
    imports it for our loader."""
    start = time.perf_counter()
    for _ in range(warmup):
        next(batches)
    t0, cpu0, tokens, masked = time.perf_counter(), time.process_time(), 0, 0
    for _ in range(batches_timed):
        batch = next(batches)
        tokens += batch["input_ids"].numel()
        masked += int((batch["labels"] != -100).sum()) if "labels" in batch else 0
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # NOTE: with workers=0 all the work is in this process (its threads included), so tokens per CPU second is the
    # figure a busy shared machine disturbs least; with workers it leaves out the workers' CPU and means little
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "warmup_s": t0 - start,
            "masked_frac": masked / tokens, "cpu_s": cpu, "tokens_per_cpu_s": tokens / cpu}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--tokens", required=True, help="(N, L) uint16 .npy exported by bench_peers.py")
    c.add_argument("--out", required=True)
    c.add_argument("--json", required=True, help="where to write the result")
    t = sub.add_parser("serve")
    t.add_argument("--peer", choices=("mosaic", "litdata"), required=True)
    t.add_argument("--data", required=True, help="the --out folder of convert")
    t.add_argument("--tokenizer", required=True)
    t.add_argument("--mlm-probability", type=float, required=True)
    t.add_argument("--seq-len", type=int, required=True)
    t.add_argument("--batch", type=int, required=True)
    args = p.parse_args(argv)
    if args.command == "convert":
        Path(args.json).write_text(json.dumps(convert(args), indent=1))
    else:
        serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
