"""Whole-manifest checks of an index.json dict: types, required keys, ranges (loader.format.read_index calls it).

Each problem raises IndexProblem naming where it is (`shards[2].records[5][0]`), the value found and what is
allowed; read_index turns it into a FormatError naming the file. Booleans are never taken for numbers
(`format_version: true` is refused, although Python counts True as 1).
"""
from __future__ import annotations

import re

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
COUNTS = ("sequences", "tokens", "documents_read", "documents_written", "documents_rejected", "tail_sequences",
          "shards", "empty_shards")
MAX_INT = 1 << 53  # JSON numbers past this are not exact in many readers; no size or count gets near it


class IndexProblem(ValueError):
    """One thing wrong in index.json, as a message that names where."""


def _int(value, where: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise IndexProblem(f"{where} is {value!r} ({type(value).__name__}), expected an integer")
    if not lo <= value <= hi:
        raise IndexProblem(f"{where} is {value}, expected an integer in [{lo}, {hi}]")
    return value


def _of(value, kind: type, where: str, what: str):
    if not isinstance(value, kind):
        raise IndexProblem(f"{where} is {_short(value)} ({type(value).__name__}), expected {what}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _keys(d: dict, where: str, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise IndexProblem(f"{where} lacks {missing}; the dataset is incomplete")


def check_index(index, *, readable: tuple[int, ...], checksum: str) -> None:
    """Raise IndexProblem at the first problem of the manifest; `readable`: the versions this reader knows."""
    _of(index, dict, "the manifest", "a JSON object")
    _keys(index, "the manifest", ("format_version",))
    version = index["format_version"]
    if isinstance(version, bool) or version not in readable:
        raise IndexProblem(f"format_version is {version!r}; this maskstream reads versions {list(readable)}: "
                           f"rerun `maskstream preprocess` or upgrade maskstream")
    keys = ("shards", "counts", "seq_len", "packing", "tokenizer", "masking", "config", "inputs")
    _keys(index, "the manifest", keys + (("checksum",) if version >= 2 else ()))
    if version >= 2 and index["checksum"] != checksum:
        raise IndexProblem(f"checksum is {index['checksum']!r}; format v{version} records use {checksum!r}")
    _int(index["seq_len"], "seq_len", 2, 1 << 20)
    _of(index["packing"], str, "packing", "a string")
    for key, kind, what in (("config", dict, "an object"), ("inputs", list, "a list")):
        _of(index[key], kind, key, what)
    _check_tokenizer(_of(index["tokenizer"], dict, "tokenizer", "an object"))
    _check_masking(_of(index["masking"], dict, "masking", "an object"))
    if "units" in index:
        _check_units(_of(index["units"], dict, "units", "an object"))
    counts = _of(index["counts"], dict, "counts", "an object")
    _keys(counts, "counts", ("sequences",))
    for k in COUNTS:  # the counts readers use; stages may add counts of their own
        if k in counts:
            _int(counts[k], f"counts.{k}")
    for reason, n in _of(counts.get("rejects_by_reason", {}), dict, "counts.rejects_by_reason", "an object").items():
        _int(n, f"counts.rejects_by_reason.{reason}")
    shards = _of(index["shards"], list, "shards", "a list of shard entries")
    names = set()
    for i, entry in enumerate(shards):
        _check_shard(entry, f"shards[{i}]", version)
        if entry["name"] in names:
            raise IndexProblem(f"shards[{i}].name {entry['name']!r} is listed twice")
        names.add(entry["name"])
    total = sum(e["sequences"] for e in shards)
    if total != counts["sequences"]:
        raise IndexProblem(f"shards hold {total} sequences but counts.sequences says {counts['sequences']}")


def _check_tokenizer(tok: dict) -> None:
    _keys(tok, "tokenizer", ("vocab_size", "pad_id", "mask_id", "special_ids"))
    size = _int(tok["vocab_size"], "tokenizer.vocab_size", 1, 1 << 32)
    for key in ("pad_id", "mask_id", "cls_id", "sep_id"):
        if key in tok:
            _int(tok[key], f"tokenizer.{key}", 0, size - 1)
    for j, sid in enumerate(_of(tok["special_ids"], list, "tokenizer.special_ids", "a list of token ids")):
        _int(sid, f"tokenizer.special_ids[{j}]", 0, size - 1)
    if "sha256" in tok:
        _of(tok["sha256"], str, "tokenizer.sha256", "a string")


def _check_masking(m: dict) -> None:
    _keys(m, "masking", ("mode", "static_copies", "seed", "config"))
    if m["mode"] not in ("dynamic", "static"):
        raise IndexProblem(f"masking.mode is {_short(m['mode'])}, expected 'dynamic' or 'static'")
    _int(m["static_copies"], "masking.static_copies", 1 if m["mode"] == "static" else 0, 1 << 16)
    _int(m["seed"], "masking.seed", -(1 << 63), (1 << 64) - 1)
    _of(m["config"], dict, "masking.config", "an object")


UNITS_FILE = re.compile(r"^[a-z0-9_]+\.json$")


def _check_units(units: dict) -> None:
    """The PMI n-gram vocabulary's entry (pipeline/pmi.py index_entry): a plain file name beside index.json,
    its sha256, its settings and how many n-grams it holds."""
    _keys(units, "units", ("file", "sha256", "settings", "ngrams", "ngrams_by_n"))
    if not isinstance(units["file"], str) or not UNITS_FILE.match(units["file"]):
        raise IndexProblem(f"units.file is {_short(units['file'])}, expected a plain name like 'pmi_ngrams.json'")
    if not _HEX64.match(_of(units["sha256"], str, "units.sha256", "64 hex digits")):
        raise IndexProblem(f"units.sha256 is {_short(units['sha256'])}, expected 64 lowercase hex digits")
    settings = _of(units["settings"], dict, "units.settings", "an object")
    _keys(settings, "units.settings", ("max_n", "max_ngrams", "min_count"))
    max_n = _int(settings["max_n"], "units.settings.max_n", 2, 64)
    _int(settings["max_ngrams"], "units.settings.max_ngrams", 1)
    _int(settings["min_count"], "units.settings.min_count", 1)
    total = _int(units["ngrams"], "units.ngrams", 0, settings["max_ngrams"])
    by_n = _of(units["ngrams_by_n"], dict, "units.ngrams_by_n", "an object")
    for n, count in by_n.items():
        if not n.isdigit() or not 2 <= int(n) <= max_n:
            raise IndexProblem(f"units.ngrams_by_n has length {_short(n)}, expected 2..{max_n}")
        _int(count, f"units.ngrams_by_n.{n}")
    if sum(by_n.values()) != total:
        raise IndexProblem(f"units.ngrams_by_n sums to {sum(by_n.values())} but units.ngrams says {total}")


def _check_shard(entry, where: str, version: int) -> None:
    _of(entry, dict, where, "a shard entry (an object)")
    _keys(entry, where, ("name", "bytes", "sha256", "sequences", "tokens", "records")
          + (("checksums",) if version >= 2 else ()))
    _of(entry["name"], str, f"{where}.name", "a shard name")
    size = _int(entry["bytes"], f"{where}.bytes")
    if not _HEX64.match(_of(entry["sha256"], str, f"{where}.sha256", "64 hex digits")):
        raise IndexProblem(f"{where}.sha256 is {_short(entry['sha256'])}, expected 64 lowercase hex digits")
    _int(entry["tokens"], f"{where}.tokens")
    sequences = _int(entry["sequences"], f"{where}.sequences")
    records = _of(entry["records"], list, f"{where}.records", "a list of [offset, sequences] pairs")
    previous, total = -1, 0
    for r, rec in enumerate(records):
        at = f"{where}.records[{r}]"
        if not isinstance(rec, list) or len(rec) != 2:
            raise IndexProblem(f"{at} is {_short(rec)}, expected an [offset, sequences] pair")
        offset = _int(rec[0], f"{at}[0]", previous + 1, size - 1)
        total += _int(rec[1], f"{at}[1]", 1)
        previous = offset
    if total != sequences:
        raise IndexProblem(f"{where}.records hold {total} sequences but {where}.sequences says {sequences}")
    if version >= 2:
        sums = _of(entry["checksums"], list, f"{where}.checksums", "a list of 16-hex-digit checksums")
        if len(sums) != len(records):
            raise IndexProblem(f"{where}.checksums has {len(sums)} entries for {len(records)} records")
        for r, c in enumerate(sums):
            if not isinstance(c, str) or not _HEX16.match(c):
                raise IndexProblem(f"{where}.checksums[{r}] is {_short(c)}, expected 16 lowercase hex digits")
