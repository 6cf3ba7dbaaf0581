"""Trainer benchmark: training tokens/s of our encoder against Hugging Face BertForMaskedLM, same run.

CPU: the same size, batch, sequence length, dropout and AdamW, one full training step (forward, backward,
optimizer) each; ratio target >= 1.2x. With CUDA: tokens/s and model-FLOPs utilization of `base` in bf16,
and the share of a step that on-device masking takes.
"""
from __future__ import annotations

import statistics
import time

import torch

from maskstream.bench.common import Row
from maskstream.loader.masking import MaskingConfig, Vocab, mask_batch
from maskstream.trainer.model import MLMEncoder, flops_per_token, preset

VOCAB = 30522  # bert-base-uncased
# NOTE: peak dense bf16 tensor FLOP/s per GPU name, for MFU; unknown GPUs report MFU as 0.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def _batch(B: int, L: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1000, VOCAB, (B, L), generator=g)
    lengths = torch.full((B,), L)
    uids = torch.arange(B, dtype=torch.int64)
    vocab = Vocab(size=VOCAB, pad_id=0, mask_id=103, special_ids=(0, 100, 101, 102, 103))
    word_starts = torch.ones(B, L, dtype=torch.bool)
    inputs, labels = mask_batch(tokens, word_starts, lengths, uids, seed=0, epoch=0, config=MaskingConfig(),
                                vocab=vocab)
    parts = (tokens, word_starts, lengths, uids, vocab)
    return inputs.to(device), labels.to(device), torch.ones(B, L, dtype=torch.bool, device=device), parts


def _step_time(step, *, steps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours_step(size: str, B: int, L: int, device: str, *, bf16: bool = False, compile_: bool = False):
    torch.manual_seed(0)
    model = MLMEncoder(preset(size, vocab_size=VOCAB, max_len=L)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    run = torch.compile(model) if compile_ else model
    inputs, labels, attn, _ = _batch(B, L, device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            _, loss = run(inputs, attn, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model


def hf_step(size: str, B: int, L: int, device: str, *, bf16: bool = False):
    from transformers import BertConfig, BertForMaskedLM

    cfg = preset(size, vocab_size=VOCAB, max_len=L)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        intermediate_size=cfg.d_ff, max_position_embeddings=L, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout, type_vocab_size=1, attn_implementation="sdpa"))
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    inputs, labels, attn, _ = _batch(B, L, device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=inputs, attention_mask=attn.long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def cpu_rows(quick: bool) -> list[Row]:
    size, B, L, rounds = ("tiny", 16, 128, 3) if quick else ("mini", 32, 128, 6)
    ours = ours_step(size, B, L, "cpu")[0]
    try:
        hf = hf_step(size, B, L, "cpu")
    except ImportError:
        print("  transformers is not installed (make bench-env): no Hugging Face anchor")
        hf = None
    # NOTE: alternate the two, a step each per round, so a busy machine slows both alike
    t_ours, t_hf = [], []
    for _ in range(rounds + 1):
        t_ours.append(_step_time(ours, steps=1, warmup=0, device="cpu"))
        if hf:
            t_hf.append(_step_time(hf, steps=1, warmup=0, device="cpu"))
    ours_tps = B * L / statistics.median(t_ours[1:])  # the first round is warm-up
    hf_tps = B * L / statistics.median(t_hf[1:]) if hf else None
    print(f"  {size} (B={B}, L={L}, vocab {VOCAB}) CPU training: ours {ours_tps:,.0f} tokens/s"
          + (f", BertForMaskedLM {hf_tps:,.0f} tokens/s, {ours_tps / hf_tps:.2f}x" if hf else ""))
    return [Row(area="trainer", name=f"train step {size} CPU", value=ours_tps, unit="tokens/s",
                anchor="HF BertForMaskedLM" if hf else "", anchor_value=hf_tps, target=">= 1.2x")]


def gpu_rows(quick: bool) -> list[Row]:
    B, L, steps = (32, 128, 5) if quick else (128, 128, 20)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
    step, model = ours_step("base", B, L, "cuda", bf16=True, compile_=True)
    dt = _step_time(step, steps=steps, warmup=3, device="cuda")
    tps = B * L / dt
    mfu = tps * flops_per_token(model.config, L) / peak if peak else 0.0
    hf = B * L / _step_time(hf_step("base", B, L, "cuda", bf16=True), steps=steps, warmup=3, device="cuda")
    # masking share: masking one batch on the device, against one whole training step
    _, _, _, (tokens, starts, lengths, uids, vocab) = _batch(B, L, "cpu")
    tokens, starts, lengths, uids = (t.cuda() for t in (tokens, starts, lengths, uids))
    mask_dt = _step_time(lambda: mask_batch(tokens, starts, lengths, uids, seed=0, epoch=1,
                                            config=MaskingConfig(), vocab=vocab), steps=steps, warmup=3,
                         device="cuda")
    print(f"  base bf16 on {name} (B={B}, L={L}): {tps:,.0f} tokens/s, MFU {mfu:.1%}, HF {hf:,.0f} tokens/s; "
          f"masking {mask_dt * 1e3:.2f} ms of a {dt * 1e3:.1f} ms step ({mask_dt / dt:.1%})")
    return [Row(area="trainer", name="train step base bf16 GPU", value=tps, unit="tokens/s",
                anchor="HF BertForMaskedLM", anchor_value=hf, target=">= 1.2x"),
            Row(area="trainer", name="MFU base bf16", value=100 * mfu, unit="%", target=">= 45"),
            Row(area="trainer", name="masking share of step", value=100 * mask_dt / dt, unit="%",
                higher_is_better=False)]


def run(args) -> list[Row]:
    quick = bool(getattr(args, "quick", False))
    rows = cpu_rows(quick)
    if torch.cuda.is_available():
        rows += gpu_rows(quick)
    else:
        print("  no CUDA device: GPU tokens/s, MFU and masking share skipped")
    return rows
