"""Document-aware attention: a packed row gives what each of its documents gives alone; ids from starts."""
from __future__ import annotations

import pytest
import torch

from maskstream.loader import documents
from maskstream.loader.stages import document_fields
from maskstream.trainer.model import MLMEncoder, preset


def packed(doc_lengths: list[list[int]], seq_len: int, seed: int = 0):
    """(input_ids, attention_mask, starts, docs): rows of documents packed back to back, then padding (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(doc_lengths), seq_len, dtype=torch.int64)
    starts = torch.zeros(len(doc_lengths), seq_len, dtype=torch.bool)
    mask = torch.zeros(len(doc_lengths), seq_len, dtype=torch.bool)
    docs = []
    for r, lengths in enumerate(doc_lengths):
        pos = 0
        for n in lengths:
            ids[r, pos:pos + n] = torch.randint(5, 97, (n,), generator=g)
            starts[r, pos] = True
            docs.append((r, pos, n))
            pos += n
        mask[r, :pos] = True
    return ids, mask, starts, docs


def fields(starts, mask):
    """(document_ids, position_ids) as the loader makes them (loader.stages.document_fields) for these starts."""
    inside = starts.clone()
    inside[:, 0] = False  # the loader records starts inside a row; position 0 always starts one
    ids, positions = document_fields(inside.numpy(), mask.sum(dim=1).numpy())
    return torch.from_numpy(ids), torch.from_numpy(positions)


def test_doc_attention_takes_the_batchs_document_fields_and_full_attention_none():
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.int64), "document_ids": torch.zeros(1, 4, dtype=torch.int32),
             "position_ids": torch.arange(4)[None]}
    got = documents.attention_inputs(batch, "doc")
    assert got["document_ids"] is batch["document_ids"] and got["position_ids"] is batch["position_ids"]
    assert documents.attention_inputs(batch, "full") == {}
    assert documents.attention_inputs({"input_ids": batch["input_ids"]}, "doc") == {}  # one document per row


@pytest.mark.parametrize("rope", [True, False])
def test_doc_aware_attention_over_a_packed_row_equals_each_document_run_alone(rope):
    torch.manual_seed(0)
    model = MLMEncoder(preset("tiny", vocab_size=97, max_len=32, rope=rope)).eval()
    ids, mask, starts, docs = packed([[5, 9, 11], [14, 7], [32]], seq_len=32)
    document_ids, position_ids = fields(starts, mask)
    with torch.no_grad():
        hidden = model.encode(ids, mask, document_ids=document_ids, position_ids=position_ids)
        for r, lo, n in docs:
            alone = model.encode(ids[r:r + 1, lo:lo + n], torch.ones(1, n, dtype=torch.bool))
            torch.testing.assert_close(hidden[r, lo:lo + n], alone[0], atol=1e-5, rtol=1e-5)
        full = model.encode(ids, mask)
    assert not torch.allclose(full[0, 5:14], hidden[0, 5:14], atol=1e-3)  # full attention does leak across
    assert torch.isfinite(hidden).all()  # padded rows included


def test_one_document_per_row_is_full_attention():
    torch.manual_seed(0)
    model = MLMEncoder(preset("tiny", vocab_size=97, max_len=16)).eval()
    ids, mask, starts, _ = packed([[16], [10]], seq_len=16)
    document_ids, position_ids = fields(starts, mask)
    with torch.no_grad():
        doc = model.encode(ids, mask, document_ids=document_ids, position_ids=position_ids)
        torch.testing.assert_close(doc[mask], model.encode(ids, mask)[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_flex_attention_kernel_gives_the_sdpa_outputs():
    torch.manual_seed(0)
    model = MLMEncoder(preset("tiny", vocab_size=97, max_len=32)).eval()
    ids, mask, starts, _ = packed([[5, 9, 11], [14, 7]], seq_len=32)
    inputs = dict(zip(("document_ids", "position_ids"), fields(starts, mask), strict=True))
    with torch.no_grad():
        sdpa = model.encode(ids, mask, **inputs)
        model.kernel = "flex"
        flex = model.encode(ids, mask, **inputs)
    real = mask[..., None].expand_as(sdpa)
    torch.testing.assert_close(flex[real], sdpa[real], atol=1e-5, rtol=1e-5)
