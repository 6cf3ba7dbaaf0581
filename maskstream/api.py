"""The Python API: `maskstream.preprocess(...)` and `maskstream.train_tokenizer(...)`, the CLI's commands as calls.

Options are the command's flags in snake_case (`--seq-len 64` -> `seq_len=64`, `--whole-word` ->
`whole_word=True`). They are turned back into flags and parsed by the command's own parser, so a call is
validated exactly as the command line is (one rule in one place); only, a mistake raises UserError where the
CLI prints one line and exits 2. An option neither command knows raises UnknownOption (a UserError and a
TypeError, as Python's own unexpected keyword arguments) naming the closest spelling.

    import maskstream
    maskstream.train_tokenizer(["corpus.jsonl"], "tok.json", vocab_size=8000, kind="bpe")
    summary = maskstream.preprocess(["corpus.jsonl"], "tok.json", "shards/", seq_len=128, num_shards=4)
    summary.counts["sequences"], summary.shards

Imports nothing heavy: Beam and the tokenizers library load when a function runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import time
from collections.abc import Mapping, Sequence

from maskstream.errors import UserError

# the arguments each function takes by name, so they are no keyword options
_POSITIONAL = {"preprocess": ("input", "tokenizer", "output"), "train_tokenizer": ("input", "out")}


class UnknownOption(UserError, TypeError):
    """A keyword argument that is no flag of the command."""


class RaisingParser(argparse.ArgumentParser):
    """The commands' parsers, raising UserError where the CLI prints usage and exits."""

    def error(self, message):
        raise UserError(message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreprocessSummary:
    """What `preprocess` wrote: the dataset's folder, its index.json and shards, and the job's counts."""
    output: str
    index_path: str
    shards: tuple[str, ...]        # every shard's path, in order
    seq_len: int
    counts: dict                   # index.json "counts": documents read/written/rejected, sequences, tokens...
    seconds: float
    index: dict = dataclasses.field(repr=False)   # the whole index.json


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerSummary:
    """What `train_tokenizer` wrote: the tokenizer.json and its special-token facts."""
    path: str
    kind: str
    vocab_size: int
    pad_id: int
    mask_id: int
    cls_id: int
    sep_id: int
    sha256: str


def preprocess(inputs, tokenizer, output, *, beam_options: Sequence[str] | Mapping | None = None,
               **options) -> PreprocessSummary | None:
    """Run the Beam job (`maskstream preprocess`): `inputs` (a path or glob, or a list of them) tokenized with
    `tokenizer` (a tokenizer.json) into shards under `output`. Options are the command's flags in snake_case;
    `beam_options` are Beam's pipeline options, as flags (`["--runner=DataflowRunner", ...]`) or a dict
    (`{"runner": "DataflowRunner"}`). Returns the summary, or None when Beam only built the graph
    (`--dry_run`, `--template_location`)."""
    from maskstream.pipeline import run, shards
    argv = [*_flags("input", _paths(inputs)), "--tokenizer", os.fspath(tokenizer), "--output", os.fspath(output),
            *option_flags("preprocess", run.parser(RaisingParser), options), *_beam_flags(beam_options)]
    start = time.perf_counter()
    index = run.run(argv, parser_class=RaisingParser)
    if not index:
        return None
    from maskstream.loader.format import INDEX_FILE
    out = os.fspath(output)
    return PreprocessSummary(output=out, index_path=shards.join(out, INDEX_FILE),
                             shards=tuple(shards.join(out, s["name"]) for s in index["shards"]),
                             seq_len=index["seq_len"], counts=index["counts"],
                             seconds=time.perf_counter() - start, index=index)


def train_tokenizer(inputs, output, **options) -> TokenizerSummary:
    """Train a tokenizer (`maskstream tokenizer train`) on `inputs` (a path or glob, or a list of them) and save
    it to `output`. Options are the command's flags in snake_case: `vocab_size=` (required), `kind=`
    ("wordpiece" or "bpe"), `text_field=`, `sample_bytes=`."""
    from maskstream.pipeline import tokenizer
    train = _subparser(tokenizer.parser(RaisingParser), "train")
    argv = ["train", *_flags("input", _paths(inputs)), "--out", os.fspath(output),
            *option_flags("train_tokenizer", train, options)]
    path, info = tokenizer.run(argv, parser_class=RaisingParser)
    return TokenizerSummary(path=path, kind=info.kind, vocab_size=info.vocab_size, pad_id=info.pad_id,
                            mask_id=info.mask_id, cls_id=info.cls_id, sep_id=info.sep_id, sha256=info.sha256)


def option_flags(function: str, parser: argparse.ArgumentParser, options: Mapping) -> list[str]:
    """Keyword options as the parser's flags; a name that is no flag raises UnknownOption."""
    actions = {a.dest: a for a in parser._actions
               if a.option_strings and a.dest not in ("help", *_POSITIONAL[function])}
    argv = []
    for name, value in options.items():
        action = actions.get(name)
        if action is None:
            close = difflib.get_close_matches(name, list(actions), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}=?" if close else ""
            raise UnknownOption(f"{function}() got an unknown option {name}={value!r}{hint} (options are the "
                                f"command's flags in snake_case: {', '.join(sorted(actions))})")
        flag = action.option_strings[0]
        if value is None:       # the command's default
            continue
        if action.nargs == 0:   # a switch (--whole-word)
            if not isinstance(value, bool):
                raise UserError(f"{name}={value!r}: pass True or False (the flag {flag} takes no value)")
            argv += [flag] if value != action.default else []
        elif action.nargs in ("+", "*"):
            argv += _flags(name, _paths(value), flag=flag)
        else:
            argv.append(f"{flag}={value}")   # `=`: a value such as -1 is never read as a flag
    return argv


def _paths(value) -> list[str]:
    """A path (str or os.PathLike) or a sequence of them, as strings."""
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


def _flags(name: str, values: list[str], *, flag: str | None = None) -> list[str]:
    if not values:
        raise UserError(f"{name}: pass one or more paths or globs")
    return [flag or f"--{name}", *values]


def _beam_flags(beam_options) -> list[str]:
    """Beam's pipeline options as flags; run() refuses those Beam does not define."""
    if not beam_options:
        return []
    if isinstance(beam_options, Mapping):
        return [f"--{k}" if v is True else f"--{k}={v}" for k, v in beam_options.items() if v not in (None, False)]
    if isinstance(beam_options, str) or not all(isinstance(a, str) and a.startswith("-") for a in beam_options):
        raise UserError(f"beam_options={beam_options!r}: pass a list of flags such as ['--runner=DataflowRunner'] "
                        "or a dict such as {'runner': 'DataflowRunner'}")
    return list(beam_options)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The subcommand's parser (argparse keeps them in its subparsers action's choices)."""
    return next(a.choices[name] for a in parser._actions if isinstance(a.choices, dict) and name in a.choices)
