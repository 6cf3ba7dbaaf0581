"""Documents inside packed rows: document ids and per-document positions from where documents start.

Batch keys (format v2 batches carry them; these functions make them for batches that do not):

    document_ids  (B, L) int32  0 for the row's first document, +1 at each document start
    position_ids  (B, L) int64  restarting at 0 at each document start

Pure tensor functions, any device. A format v1 dataset records no document starts, but full packing joins the
documents of a group with the tokenizer's separator (pipeline/packing.py), and masking never touches a special
token: a document starts right after a separator that is not the row's last real token.
"""
from __future__ import annotations

import torch
from torch import Tensor


def from_starts(starts: Tensor) -> tuple[Tensor, Tensor]:
    """(document_ids (B, L) int32, position_ids (B, L) int64) from (B, L) bool document starts.

    Position 0 always starts a document, whether marked or not.
    """
    B, L = starts.shape
    starts = starts.to(torch.bool).clone()
    starts[:, 0] = True
    document_ids = torch.cumsum(starts.to(torch.int32), dim=1, dtype=torch.int32) - 1
    pos = torch.arange(L, device=starts.device, dtype=torch.int64).expand(B, L)
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values  # (B, L) its doc's start
    return document_ids, pos - first


def separator_starts(input_ids: Tensor, lengths: Tensor, sep_id: int) -> Tensor:
    """(B, L) bool: the positions right after a separator, inside the row's real tokens (format v1 full packing)."""
    B, L = input_ids.shape
    after_sep = torch.zeros(B, L, dtype=torch.bool, device=input_ids.device)
    after_sep[:, 1:] = input_ids[:, :-1] == sep_id
    return after_sep & (torch.arange(L, device=input_ids.device)[None, :] < lengths[:, None])



def attention_inputs(batch: dict, attention: str, index: dict) -> dict:
    """The model's document inputs under `--attention` doc (model_inputs) or full ({}); index: the dataset's."""
    return model_inputs(batch, index["tokenizer"].get("sep_id")) if attention == "doc" else {}


def model_inputs(batch: dict, sep_id: int | None) -> dict:
    """{document_ids, position_ids} for the model: the batch's own (format v2), else found from separators
    (format v1), else {} (one document per row: no separator id to find them by)."""
    if "document_ids" in batch:
        return {"document_ids": batch["document_ids"], "position_ids": batch["position_ids"]}
    if sep_id is None:
        return {}
    lengths = batch["attention_mask"].sum(dim=1)
    document_ids, position_ids = from_starts(separator_starts(batch["input_ids"], lengths, sep_id))
    return {"document_ids": document_ids, "position_ids": position_ids}
