"""Mask-rate schedules: the fraction of tokens masked at an optimizer step, a pure function of (step, total).

    rate = parse_schedule("linear:0.3:0.15")(step, total)   # 0.30 at step 0 .. 0.15 at the last step

Ankner et al. (EACL 2024) train BERT-base with a 30 % -> 15 % linear schedule; ModernBERT and MosaicBERT at a
constant 30 %. The rate is a plain float handed to the masking rule (loader.masking.mask_batch), so a mask stays a
pure function of (seed, epoch, uid, rate) and a resumed run, at the same step, masks the same positions.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from maskstream.errors import UserError

# shape name -> t in [0, 1] (the run's progress) -> weight of the end rate, 0 at t=0 and 1 at t=1
SHAPES: dict[str, Callable[[float], float]] = {
    "constant": lambda t: 0.0,
    "linear": lambda t: t,
    "cosine": lambda t: 0.5 * (1.0 - math.cos(math.pi * t)),
}
EXAMPLE = "constant:0.15 | linear:0.3:0.15 | cosine:0.3:0.15"
DECIMALS = 6  # rates are rounded here: the value logged is exactly the value the rule used


@dataclass(frozen=True, kw_only=True)
class MaskSchedule:
    """A mask-rate schedule over a run: `shape` from `start` (step 0) to `end` (the last step)."""
    shape: str
    start: float
    end: float

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise UserError(f"--mask-schedule shape {self.shape!r} is unknown; choose one of {', '.join(SHAPES)} "
                            f"(e.g. {EXAMPLE})")
        for rate in (self.start, self.end):
            if not 0.0 < rate < 1.0:
                raise UserError(f"--mask-schedule rate {rate} must be in (0, 1); e.g. {EXAMPLE}")

    def __call__(self, step: int, total: int) -> float:
        """The rate at optimizer step `step` (0-based) of a run of `total` steps."""
        t = min(1.0, max(0.0, step / (total - 1))) if total > 1 else 0.0
        return round(self.start + (self.end - self.start) * SHAPES[self.shape](t), DECIMALS)

    def spec(self) -> str:
        """The flag's text, the inverse of parse_schedule."""
        return f"constant:{self.start:g}" if self.shape == "constant" else f"{self.shape}:{self.start:g}:{self.end:g}"


def parse_schedule(text: str) -> MaskSchedule:
    """`constant:P`, `linear:P0:P1` or `cosine:P0:P1` -> a MaskSchedule; a malformed flag is a UserError."""
    shape, *rates = text.strip().split(":")
    want = 1 if shape == "constant" else 2
    try:
        values = [float(r) for r in rates]
    except ValueError:
        values = []
    if len(values) != want:
        raise UserError(f"--mask-schedule {text!r} is malformed; write one of {EXAMPLE}")
    return MaskSchedule(shape=shape, start=values[0], end=values[-1])
