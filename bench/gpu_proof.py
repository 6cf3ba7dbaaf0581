"""The GPU proof's figures and its one table (`bash bench/gpu_check.sh` runs it after the `gpu` tests).

    python -m maskstream.bench.gpu_proof --data gpu-bundle/data --junit gpu-bundle/out/gpu-tests.xml
    python -m maskstream.bench.gpu_proof --data DIR --dry      # the same code on the CPU, tiny and short

Rows: every `gpu` test's outcome (pytest's JUnit XML); masking time per batch (the dataset's rate and a 30 %
schedule rate) and its share of a BERT-base bf16 training step; the data-wait share of that step (MLMLoader over
the bundled dataset, masked on the device, as the trainer takes it); `base` tokens/s and model-FLOPs utilization
with document-aware attention. The step mirrors trainer/train.py: autocast bf16, document ids and positions from
loader.documents, fused AdamW, one host sync per step (the trainer's finite-loss check).
"""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from maskstream.bench.bench_trainer import PEAK_BF16
from maskstream.loader import documents
from maskstream.loader.masking import IGNORE_INDEX, mask_batch
from maskstream.loader.stream import LoaderConfig, MLMLoader
from maskstream.trainer.model import MLMEncoder, flops_per_token, preset

TARGETS = {"masking": 1.0, "data_wait": 2.0, "mfu": 35.0}  # % of a step, % of a step, % of peak (issue 12)


def test_rows(junit: Path | None) -> list[tuple]:
    """(check, result, target, ok) per test case in pytest's JUnit XML; a missing file is one failed row."""
    if junit is None:
        return []
    if not junit.is_file():
        return [("gpu tests", f"no report at {junit}", "all pass", False)]
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        rows.append((f"test {case.get('name')}", outcome, "passed", outcome == "passed"))
    return rows or [("gpu tests", "none collected", "all pass", False)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device, *, repeat: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() on the device (synchronized around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def raw_batch(loader: MLMLoader, device: torch.device) -> dict:
    """One batch of the dataset unmasked again (tokens, lengths, uids) on the device, from the public API.

    Word starts are not in a masked batch; the dataset's token selection does not read them.
    """
    loader.set_epoch(0)
    batch = next(iter(loader))
    labels, inputs = batch["labels"], batch["input_ids"]
    tokens = torch.where(labels != IGNORE_INDEX, labels, inputs)
    return {"tokens": tokens.to(device), "word_starts": torch.ones_like(tokens, dtype=torch.bool, device=device),
            "lengths": batch["attention_mask"].sum(dim=1).to(device), "uids": batch["uids"].to(device)}


def masking_ms(loader: MLMLoader, device: torch.device, rate: float | None, repeat: int) -> float:
    raw = raw_batch(loader, device)
    return timed_ms(lambda: mask_batch(raw["tokens"], raw["word_starts"], raw["lengths"], raw["uids"], seed=0,
                                       epoch=1, config=loader.masking, vocab=loader.vocab, rate=rate),
                    device, repeat=repeat)


def training(loader: MLMLoader, device: torch.device, *, size: str, steps: int, warmup: int, compile_: bool):
    """(step ms, data-wait share, tokens/s, MFU, model config) of doc-aware training steps over the loader."""
    torch.manual_seed(0)
    model = MLMEncoder(preset(size, vocab_size=loader.vocab.size, max_len=loader.seq_len)).to(device).train()
    model.kernel = "flex" if device.type == "cuda" else "sdpa"  # as trainer/train.py chooses
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    run = torch.compile(model) if compile_ else model
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def batches():
        while True:
            yield from loader

    loader.set_epoch(0)  # NOTE: warm-up + steps stay inside one epoch: no worker start-up in the figures
    stream, waits, totals = batches(), [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(stream)
        t1 = time.perf_counter()
        with amp:
            _, loss = run(batch["input_ids"], batch["attention_mask"], batch["labels"],
                          **documents.attention_inputs(batch, "doc"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the trainer's one host sync per step
        if i >= warmup:
            waits.append(t1 - t0)
            totals.append(time.perf_counter() - t0)
    step_s = sum(totals) / len(totals)
    tokens_per_s = loader.config.batch_size * loader.seq_len / step_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
    mfu = tokens_per_s * flops_per_token(model.config, loader.seq_len) / peak if peak else 0.0
    return 1e3 * step_s, sum(waits) / sum(totals), tokens_per_s, mfu, name


class _OutOfTime(Exception):
    pass


def within(seconds: int, fn):
    """fn() or _OutOfTime after `seconds` (SIGALRM): a slow compile must not keep the table from coming out."""
    def stop(signum, frame):
        raise _OutOfTime(f"over {seconds} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def measure(args) -> list[tuple]:
    """The eager model first (the trainer's default: compiled flex attention inside), then, time allowing, the
    compiled model; the MFU target is judged on the faster of the two."""
    device = torch.device("cpu" if args.dry else "cuda")
    size, batch_size, steps, warmup = ("tiny", 4, 3, 1) if args.dry else (args.model_size, args.batch_size, 26, 4)
    loader = MLMLoader(args.data, LoaderConfig(batch_size=batch_size, seed=0, num_workers=args.num_workers),
                       device=str(device))
    run = lambda compile_: training(loader, device, size=size, steps=steps, warmup=warmup,  # noqa: E731
                                    compile_=compile_)
    try:
        step_ms, wait, tps, mfu, name = within(args.budget_s, lambda: run(False))
    except Exception as e:  # noqa: BLE001 - the table must still come out, naming what failed
        return [(f"{size} doc-aware training step", f"FAILED: {type(e).__name__}: {e}"[:160], "-", False)]
    precision = "bf16" if device.type == "cuda" else "fp32"
    shape = f"{size} {precision}, B={batch_size}, L={loader.seq_len}, doc-aware, {name}"
    rows = []
    for label, rate in (("dataset rate", None), ("schedule at 30 %", 0.3)):
        ms = masking_ms(loader, device, rate, repeat=5 if args.dry else 50)
        share = 100 * ms / step_ms
        rows.append((f"masking per batch, {label} (share of a {step_ms:.1f} ms step)", f"{ms:.3f} ms ({share:.2f} %)",
                     f"< {TARGETS['masking']:g} %", share < TARGETS["masking"]))
    rows.append((f"data wait, share of a step ({args.num_workers} workers)", f"{100 * wait:.2f} %",
                 f"< {TARGETS['data_wait']:g} %", 100 * wait < TARGETS["data_wait"]))
    rows.append((f"tokens/s, {shape}", f"{tps:,.0f}", "-", True))
    best = mfu
    if not args.dry and not args.no_compile:
        try:
            _, _, tps_c, mfu_c, _ = within(args.budget_s, lambda: run(True))
            rows.append((f"tokens/s, {shape}, torch.compile", f"{tps_c:,.0f} (MFU {100 * mfu_c:.1f} %)", "-", True))
            best = max(best, mfu_c)
        except Exception as e:  # noqa: BLE001
            rows.append(("tokens/s, torch.compile", f"FAILED: {type(e).__name__}: {e}"[:160], "-", False))
    rows.append(("model-FLOPs utilization (the faster)", f"{100 * best:.1f} %", f">= {TARGETS['mfu']:g} %",
                 100 * best >= TARGETS["mfu"]))
    return rows


def table(rows: list[tuple]) -> str:
    head = ("check", "result", "target", "ok")
    body = [(c, r, t, "yes" if ok else "NO") for c, r, t, ok in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line("-" * w for w in widths)] + [line(b) for b in body])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m maskstream.bench.gpu_proof", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a shard folder made by the Beam job (make gpu-prep)")
    p.add_argument("--junit", default=None, help="pytest's --junitxml report of the gpu tests")
    p.add_argument("--dry", action="store_true", help="on the CPU, tiny model, a few steps: checks the code paths")
    p.add_argument("--model-size", default="base")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--no-compile", action="store_true", help="time the eager model only (no torch.compile)")
    p.add_argument("--budget-s", type=int, default=80, help="seconds each timed training may take")
    args = p.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        p.error("torch sees no CUDA device; pass --dry to check the script on the CPU")
    rows = test_rows(Path(args.junit) if args.junit else None) + measure(args)
    print(f"\n=== GPU proof ({'dry run on the CPU: figures are not GPU figures' if args.dry else 'CUDA'}, "
          f"torch {torch.__version__}) ===")
    print(table(rows))
    return 0 if all(ok for *_, ok in rows) or args.dry else 1


if __name__ == "__main__":
    sys.exit(main())
