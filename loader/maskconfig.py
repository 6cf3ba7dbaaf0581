"""The masking rule's configuration and the vocabulary facts it needs: plain dataclasses, no torch.

Kept apart from loader/masking.py so that the Beam launcher and its workers can build, validate and record a
masking config without importing torch (seconds of start-up per process); the rule itself is in masking.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from maskstream.errors import UserError

IGNORE_INDEX = -100
SELECTIONS = ("token", "word", "span", "pmi")
COUNTS = ("exact", "bernoulli")


@dataclass(frozen=True, kw_only=True)
class MaskingConfig:
    """What to select and how to corrupt it; the same config gives the same masks everywhere."""
    mask_prob: float = 0.15
    mask_token_frac: float = 0.8    # of the selected: replaced by the mask token
    random_token_frac: float = 0.1  # of the selected: replaced by a random non-special token; the rest unchanged
    selection: str = "token"        # token | word (whole word) | span (SpanBERT, whole-word aligned) | pmi
                                    # (PMI n-grams whole, else single words; 80/10/10 per unit; needs unit starts)
    count: str = "exact"            # exact: round(p*n) per sequence (at least 1) | bernoulli: each unit with p
    span_p: float = 0.2             # span lengths in words ~ Geometric(span_p) ...
    span_max: int = 10              # ... cut at span_max

    def __post_init__(self):
        if not 0.0 < self.mask_prob < 1.0:
            raise UserError(f"mask_prob={self.mask_prob} must be in (0, 1); pass e.g. --mask-prob 0.15")
        if self.mask_token_frac < 0 or self.random_token_frac < 0 or \
                self.mask_token_frac + self.random_token_frac > 1.0:
            raise ValueError(f"mask_token_frac={self.mask_token_frac} and random_token_frac="
                             f"{self.random_token_frac} must be >= 0 and sum to <= 1 (BERT: 0.8 and 0.1)")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r}; choose one of {SELECTIONS}")
        if self.count not in COUNTS:
            raise ValueError(f"count={self.count!r}; choose one of {COUNTS}")
        if not 0.0 < self.span_p <= 1.0 or self.span_max < 1:
            raise ValueError(f"span_p={self.span_p} must be in (0, 1] and span_max={self.span_max} >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MaskingConfig":
        return cls(**d)


@dataclass(frozen=True, kw_only=True)
class Vocab:
    """The token facts masking needs, read from the tokenizer or index.json."""
    size: int
    pad_id: int
    mask_id: int
    special_ids: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "special_ids", tuple(sorted(set(int(i) for i in self.special_ids))))
        for name in ("pad_id", "mask_id"):
            if not 0 <= getattr(self, name) < self.size:
                raise ValueError(f"{name}={getattr(self, name)} outside the vocabulary of size {self.size}")
        if len(self.special_ids) >= self.size:
            raise ValueError("every token is special: nothing left to mask or to draw random replacements from")

    def to_dict(self) -> dict:
        return {"size": self.size, "pad_id": self.pad_id, "mask_id": self.mask_id,
                "special_ids": list(self.special_ids)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(size=d["size"], pad_id=d["pad_id"], mask_id=d["mask_id"], special_ids=tuple(d["special_ids"]))

    @classmethod
    def from_index(cls, index: dict) -> "Vocab":
        """The one way to get a Vocab from an index.json dict (its "tokenizer" entry)."""
        t = index["tokenizer"]
        return cls(size=t["vocab_size"], pad_id=t["pad_id"], mask_id=t["mask_id"], special_ids=tuple(t["special_ids"]))
