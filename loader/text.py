"""Token ids as text a person reads, through the tokenizer's own decoder (WordPiece `##`, byte-level BPE bytes).

Used by `inspect --show` and `fill-mask`. Byte-level BPE pieces (`Ġthe`, `Ċ`, `ãĢĤ`) are never shown raw: every
piece goes through the decoder, and a character split over several tokens is shown once, on the tokens that
make it. Also the one spelling of a uid in any output (16 hex digits) and where a dataset's tokenizer lies.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

NEWLINE = "⏎"   # a decoded line break, so one sequence stays on one line of output


def uid_text(uid: int) -> str:
    """A uid (uint64, or its int64 view in batches) as 16 hex digits: the one spelling in every output."""
    return f"{uid & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def token_text(tokenizer, token_id: int) -> str:
    """One token as the decoder writes it alone (`states`, `##ing`, `é`), specials included."""
    return tokenizer.decode([token_id], skip_special_tokens=False).strip().replace("\n", NEWLINE)


def mask_marker(tokenizer, mask_id: int, word: str = "") -> str:
    """The tokenizer's own mask token, with the word it hides: `[MASK/states]`, `<mask/states>`."""
    token = tokenizer.id_to_token(mask_id) or "[MASK]"
    if not word:
        return token
    return f"{token[:-1]}/{word}{token[-1]}" if token[-1] in "]>" else f"{token}/{word}"


class Unit(NamedTuple):
    positions: tuple[int, ...]   # the token positions whose decoded text this is (several for a split char)
    text: str                    # with the leading space the decoder puts before it, if any


def decode_units(tokenizer, ids: list[int]) -> list[Unit]:
    """ids split into the smallest runs the decoder writes as a prefix of the whole: normally one token each.

    NOTE: decoding ids[:i+1] for every i costs O(L^2) token decodes; fine for the few sequences shown. When a
    token changes text decoded before it (the second half of a UTF-8 character, a WordPiece cleanup such as
    `do n't` -> `don't`), it joins the runs it changed."""
    units: list[Unit] = []
    done = ""
    for i in range(len(ids)):
        now = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        positions: tuple[int, ...] = (i,)
        while units and not now.startswith(done):
            last = units.pop()
            done = done[: len(done) - len(last.text)]
            positions = last.positions + positions
        units.append(Unit(positions, now[len(done):]))
        done = now
    return units


def dataset_tokenizer(root: str, index: dict, given: str | None = None):
    """The tokenizers.Tokenizer of a dataset: `given`, else DIR/tokenizer.json (local), else the file its
    index.json names; None when none is found."""
    recorded = ((index.get("config") or {}).get("tokenize") or {}).get("tokenizer")
    for path in (given, os.path.join(root, "tokenizer.json") if "://" not in root else None, recorded):
        if isinstance(path, str) and Path(path).is_file():
            from tokenizers import Tokenizer
            return Tokenizer.from_file(path)
    return None
