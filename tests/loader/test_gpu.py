"""On a CUDA device: batches pinned, moved and masked there are bit-identical to CPU masking."""
import pytest
import torch
from helpers import collect

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
