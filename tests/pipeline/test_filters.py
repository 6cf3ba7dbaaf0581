"""Quality rules (pipeline/filters.py) without Beam: each rule passes real prose and rejects its kind of junk,
and --filters specs parse into settings or fail in one line."""
from __future__ import annotations

import pytest
from helpers import sotu_texts

from maskstream.errors import UserError
from maskstream.pipeline import filters

GOPHER = filters.parse_filters("gopher")
PROSE = " ".join(["The committee met on Tuesday and agreed that the new budget should fund schools and roads."] * 1)

# rule -> a document that fails it (and only it, among Gopher's rules where possible)
JUNK = {
    "word_count": "Too short to be a document with the words it has.",
    "mean_word_length": " ".join(["a an to of be it is"] * 20),
    "symbol_word_ratio": " ".join([f"#tag{i} word and the of more" for i in range(60)]),
    "ellipsis_lines": "\n".join([f"line {i} of the story goes on and then..." for i in range(60)]),
    "bullet_lines": "\n".join([f"• item {i} with the words of a list" for i in range(60)]),
    "alpha_words": " ".join(["the 12 34 56 78 of 90 12 and"] * 20),
    "stop_words": " ".join([f"Quarterly revenue grew {i} percent annually" for i in range(20)]),
    "duplicate_lines": "\n".join(["the same line of the text again and again"] * 30 + [PROSE]),
    "duplicate_ngrams": " ".join(["the cat sat on the mat with the dog"] * 20),
}


def test_real_addresses_pass_every_gopher_rule():
    assert [filters.check(t, GOPHER) for t in sotu_texts()[:20]] == [None] * 20


@pytest.mark.parametrize("rule", sorted(JUNK))
def test_each_rule_rejects_its_kind_of_junk_and_says_why(rule):
    fn, settings = filters.RULES[rule]
    detail = fn(filters.text_of(JUNK[rule]), **settings)
    assert detail is not None and "allowed" in detail
    assert filters.check(JUNK[rule], filters.parse_filters(rule))[0] == rule


def test_specs_name_presets_rules_settings_and_removals():
    config = filters.parse_filters("gopher,word_count.min=20,-bullet_lines")
    rules = dict(config.rules)
    assert "bullet_lines" not in rules and len(rules) == len(filters.RULES) - 1
    assert dict(rules["word_count"]) == {"min": 20.0, "max": 100_000}
    assert filters.parse_filters("none").rules == () and filters.parse_filters("").rules == ()
    assert filters.check("Too short.", filters.parse_filters("word_count.min=1")) is None


@pytest.mark.parametrize("spec, message", [("gopherr", "unknown rule 'gopherr'"),
                                           ("word_count.minimum=3", "no setting 'minimum'"),
                                           ("word_count.min=many", "needs a number")])
def test_bad_specs_are_refused_in_one_line(spec, message):
    with pytest.raises(UserError, match=message):
        filters.parse_filters(spec)
