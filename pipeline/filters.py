"""Quality filters' record logic, without Beam: one function per rule in RULES, presets by name.

The rules are Gopher's heuristics (Rae et al. 2021, appendix A; as in datatrove's GopherQualityFilter and
GopherRepetitionFilter). A rule takes a document's `Text` (words and lines computed once) and its settings,
and returns None when the document passes, else a short, deterministic reason (the measure and the limit).
A new rule is one function here and one entry in RULES with its default settings.

`--filters gopher,word_count.min=20,-bullet_lines`: a preset or rule names, `rule.setting=value` overrides,
`-rule` leaves one out. The parsed `FilterConfig` lists each rule with all its settings, recorded in index.json.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

from maskstream.errors import UserError

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "*", "-", "–", "—", "‣", "⁃")
ELLIPSES = ("...", "…")


class Text(NamedTuple):
    text: str
    words: list[str]        # whitespace-separated
    lines: list[str]        # non-empty lines, stripped


def text_of(text: str) -> Text:
    return Text(text, text.split(), [s for s in (line.strip() for line in text.splitlines()) if s])


def word_count(t: Text, *, min: float, max: float):
    n = len(t.words)
    return None if min <= n <= max else f"{n} words, allowed {min:g}..{max:g}"


def mean_word_length(t: Text, *, min: float, max: float):
    mean = sum(map(len, t.words)) / max_(len(t.words))
    return None if min <= mean <= max else f"mean word length {mean:.2f}, allowed {min:g}..{max:g}"


def symbol_word_ratio(t: Text, *, max: float):
    symbols = t.text.count("#") + sum(t.text.count(e) for e in ELLIPSES)
    ratio = symbols / max_(len(t.words))
    return None if ratio <= max else f"{ratio:.3f} symbols (#, ellipses) per word, allowed <= {max:g}"


def ellipsis_lines(t: Text, *, max: float):
    frac = sum(line.endswith(ELLIPSES) for line in t.lines) / max_(len(t.lines))
    return None if frac <= max else f"{frac:.3f} of lines end in an ellipsis, allowed <= {max:g}"


def bullet_lines(t: Text, *, max: float):
    frac = sum(line.startswith(BULLETS) for line in t.lines) / max_(len(t.lines))
    return None if frac <= max else f"{frac:.3f} of lines start with a bullet, allowed <= {max:g}"


def alpha_words(t: Text, *, min: float):
    frac = sum(any(c.isalpha() for c in w) for w in t.words) / max_(len(t.words))
    return None if frac >= min else f"{frac:.3f} of words have a letter, allowed >= {min:g}"


def stop_words(t: Text, *, min: float):
    n = sum(w.lower() in STOP_WORDS for w in t.words)
    return None if n >= min else f"{n} English stop words, allowed >= {min:g}"


def duplicate_lines(t: Text, *, max: float):
    counts = collections.Counter(t.lines)
    frac = sum(c - 1 for c in counts.values()) / max_(len(t.lines))
    return None if frac <= max else f"{frac:.3f} of lines repeat an earlier line, allowed <= {max:g}"


def duplicate_ngrams(t: Text, *, n: float, max: float):
    """Gopher's fraction of characters (of words) inside word n-grams that occur more than once."""
    n = int(n)
    words = t.words
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = collections.Counter(grams)
    covered = bytearray(len(words))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = b"\x01" * n
    total = sum(map(len, words))
    frac = sum(len(w) for w, c in zip(words, covered, strict=True) if c) / max_(total)
    return None if frac <= max else f"{frac:.3f} of characters in repeated {n}-grams, allowed <= {max:g}"


def max_(n: int) -> int:
    return n if n > 0 else 1


# name -> (rule, default settings); Gopher's values
RULES = {
    "word_count": (word_count, {"min": 50, "max": 100_000}),
    "mean_word_length": (mean_word_length, {"min": 3, "max": 10}),
    "symbol_word_ratio": (symbol_word_ratio, {"max": 0.1}),
    "ellipsis_lines": (ellipsis_lines, {"max": 0.3}),
    "bullet_lines": (bullet_lines, {"max": 0.9}),
    "alpha_words": (alpha_words, {"min": 0.8}),
    "stop_words": (stop_words, {"min": 2}),
    "duplicate_lines": (duplicate_lines, {"max": 0.3}),
    "duplicate_ngrams": (duplicate_ngrams, {"n": 5, "max": 0.15}),
}
PRESETS = {"gopher": tuple(RULES)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """The quality rules applied, each with all its settings: ((rule, ((setting, value), ...)), ...)."""
    rules: tuple = ()

    def __post_init__(self):
        for name, settings in self.rules:
            if name not in RULES:
                raise UserError(f"--filters: unknown rule {name!r}; allowed: {', '.join(RULES)} or a preset "
                                f"({', '.join(PRESETS)})")
            unknown = set(dict(settings)) - set(RULES[name][1])
            if unknown:
                raise UserError(f"--filters: rule {name} has no setting {sorted(unknown)[0]!r}; its settings: "
                                f"{', '.join(RULES[name][1])}")

    def to_dict(self) -> dict:
        return {name: dict(settings) for name, settings in self.rules}


def parse_filters(spec: str) -> FilterConfig:
    """'gopher,word_count.min=20,-bullet_lines' -> FilterConfig; '' or 'none' -> no rules."""
    chosen: dict[str, dict] = {}
    for item in (s.strip() for s in (spec or "").split(",")):
        if not item or item == "none":
            continue
        if item.startswith("-"):
            chosen.pop(item[1:], None)
        elif "=" in item:
            key, _, value = item.partition("=")
            name, _, setting = key.partition(".")
            try:
                number = float(value)
            except ValueError:
                raise UserError(f"--filters: {item!r} needs a number after '='; e.g. word_count.min=20") from None
            chosen.setdefault(name, dict(RULES.get(name, (None, {}))[1]))[setting] = number
        elif item in PRESETS:
            for name in PRESETS[item]:
                chosen.setdefault(name, dict(RULES[name][1]))
        else:
            chosen.setdefault(item, dict(RULES.get(item, (None, {}))[1]))
    return FilterConfig(rules=tuple((n, tuple(sorted(s.items()))) for n, s in sorted(chosen.items())))


def check(text: str, config: FilterConfig) -> tuple[str, str] | None:
    """The first rule (in name order) the document fails, with its detail; None when it passes all."""
    t = text_of(text)
    for name, settings in config.rules:
        detail = RULES[name][0](t, **dict(settings))
        if detail is not None:
            return name, detail
    return None
