"""On a CUDA device: batches pinned, moved and masked there are bit-identical to CPU masking, at any rate."""
import dataclasses

import pytest
import torch
from helpers import VOCAB, collect, sotu_sequences

from maskstream.loader.masking import SELECTIONS, MaskingConfig, mask_batch
from maskstream.loader.schedule import parse_schedule
from maskstream.loader.stream import LoaderConfig, MLMLoader


@pytest.mark.gpu
@pytest.mark.parametrize("workers", [0, 2])
def test_masks_made_on_the_gpu_equal_masks_made_on_the_cpu(uneven, workers):
    cfg = LoaderConfig(batch_size=16, seed=4, num_workers=workers)
    gpu_loader = MLMLoader(uneven, cfg, device="cuda")
    first = next(iter(gpu_loader))
    assert all(v.device.type == "cuda" for v in first.values())
    gpu_loader.set_epoch(1)
    cpu_loader = MLMLoader(uneven, cfg, device="cpu")
    cpu_loader.set_epoch(1)
    gpu, cpu = collect(gpu_loader), collect(cpu_loader)
    assert len(gpu) == len(cpu) == 30
    assert all(torch.equal(a[k], b[k]) for a, b in zip(gpu, cpu, strict=False) for k in a)


@pytest.mark.gpu
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("rate", [None, 0.3, 0.226])  # the dataset's rate, a constant and a mid-schedule one
def test_gpu_masks_at_a_scheduled_rate_equal_cpu_masks(selection, rate):
    tokens, lengths, word_starts, uids = (torch.from_numpy(a) for a in sotu_sequences(256))
    uids = uids.view(torch.int64)
    config = MaskingConfig(selection=selection)
    for mask_only in (False, True):
        cfg = dataclasses.replace(config, mask_token_frac=1.0, random_token_frac=0.0) if mask_only else config
        cpu = mask_batch(tokens, word_starts, lengths, uids, seed=3, epoch=1, config=cfg, vocab=VOCAB, rate=rate)
        gpu = mask_batch(tokens.cuda(), word_starts.cuda(), lengths.cuda(), uids.cuda(), seed=3, epoch=1,
                         config=cfg, vocab=VOCAB, rate=rate)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu, gpu, strict=True))


@pytest.mark.gpu
def test_a_gpu_loader_at_a_schedules_rate_equals_the_cpu_loader(uneven):
    cfg = LoaderConfig(batch_size=16, seed=4)
    loaders = [MLMLoader(uneven, cfg, device=d) for d in ("cuda", "cpu")]
    schedule = parse_schedule("linear:0.3:0.15")
    streams = [iter(loader) for loader in loaders]
    for step in range(8):
        out = []
        for loader, stream in zip(loaders, streams, strict=True):
            loader.set_mask_rate(schedule(step, 8))
            out.append(next(stream))
        assert all(torch.equal(out[0][k].cpu(), out[1][k]) for k in out[1])
