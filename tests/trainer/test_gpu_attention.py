"""On a CUDA device: document-aware attention (SDPA block mask and flex attention) equals each document alone."""
from __future__ import annotations

import pytest
import torch
from test_doc_attention import fields, packed

from maskstream.trainer.model import MASKS, MLMEncoder, preset


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", list(MASKS))
@pytest.mark.parametrize("bf16", [False, True])
def test_doc_aware_attention_on_the_gpu_equals_each_document_run_alone(kernel, bf16):
    torch.manual_seed(0)
    model = MLMEncoder(preset("mini", vocab_size=97, max_len=256, dropout=0.0)).cuda().eval()
    model.kernel = kernel
    ids, mask, starts, docs = packed([[40, 90, 126], [200, 56], [256], [17, 3, 100]], seq_len=256)
    document_ids, position_ids = (t.cuda() for t in fields(starts, mask))
    ids, mask = ids.cuda(), mask.cuda()
    tol = dict(atol=6e-2, rtol=6e-2) if bf16 else dict(atol=1e-4, rtol=1e-4)  # bf16: kernels round apart
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        hidden = model.encode(ids, mask, document_ids=document_ids, position_ids=position_ids).float()
        for r, lo, n in docs:
            model.kernel = "sdpa"  # alone: no document mask at all, just the one document
            alone = model.encode(ids[r:r + 1, lo:lo + n], torch.ones(1, n, dtype=torch.bool, device="cuda"))
            model.kernel = kernel
            torch.testing.assert_close(hidden[r, lo:lo + n], alone[0].float(), **tol)
