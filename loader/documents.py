"""The model's document inputs from a batch: what `--attention doc` hands the encoder.

Batches carry document_ids (B, L) int32 and position_ids (B, L) int64 (loader/stages.py: document_fields, from
the document starts the Beam job records; a format v1 dataset gives one document per row). A batch without them
(LoaderConfig(documents=False)) is one document per row: the encoder then attends across the row, positions 0..L-1.
"""
from __future__ import annotations

ATTENTIONS = ("doc", "full")  # doc: a token attends only within its document | full: across the whole row


def attention_inputs(batch: dict, attention: str) -> dict:
    """{document_ids, position_ids} under --attention doc when the batch has them, else {}."""
    if attention == "doc" and "document_ids" in batch:
        return {"document_ids": batch["document_ids"], "position_ids": batch["position_ids"]}
    return {}
