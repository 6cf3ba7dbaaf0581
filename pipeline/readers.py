"""Reading corpora and cleaning documents: the record logic of ReadDocuments and Clean, without Beam.

Sources (a small dict keyed by format): text (a document per line, or per blank-line separated paragraph),
JSONL (a field), Parquet (a column), each optionally gzip-compressed, local or on any Beam filesystem. A
reader yields `Raw` records with their exact position in the file (line or row number) and a pack group
(consecutive records of about `group_bytes`, a pure function of the file's content). `clean_record` turns a
Raw into document parts or a `Reject` with a reason: nothing is dropped silently.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Iterator, NamedTuple

from maskstream.errors import MissingPath, UserError

# Reject reasons, in the order the summary prints them.
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
NON_STRING_FIELD = "non_string_field"
EMPTY = "empty"
NO_TOKENS = "no_tokens"             # set by Tokenize: text that normalizes to nothing
UNPARSEABLE = "unparseable"         # any other exception while cleaning one record (e.g. RecursionError)
TOKENIZE_ERROR = "tokenize_error"   # set by Tokenize: the tokenizer raised on this document
UNREADABLE = "unreadable"           # the file could not be read past this position (e.g. a truncated .gz)
TOO_LONG = "too_long"               # a line (paragraph) over max_record_bytes: skipped unread, memory bounded
QUALITY = "quality"                 # set by Filter (pipeline/filters.py): the detail names the rule
DUPLICATE = "duplicate"             # set by Dedup (pipeline/dedup.py): the detail names the copy kept
NEAR_DUPLICATE = "near_duplicate"
REASONS = (INVALID_UTF8, MALFORMED_JSON, NOT_AN_OBJECT, MISSING_FIELD, NON_STRING_FIELD, EMPTY, NO_TOKENS,
           UNPARSEABLE, TOKENIZE_ERROR, UNREADABLE, TOO_LONG, QUALITY, DUPLICATE, NEAR_DUPLICATE)


class Raw(NamedTuple):
    source: str          # the file's key (see file_key): what uids hash, whatever the spelling of its path
    position: int        # line number (text, JSONL) or row number (Parquet), 0-based
    group: int           # pack group within the file
    fmt: str             # text | jsonl | parquet
    data: object         # bytes (text, JSONL) or the column's value (Parquet)


class Doc(NamedTuple):
    source: str
    position: int
    part: int            # > 0 only for pieces of an oversized document
    group: int
    text: str


class Reject(NamedTuple):
    source: str
    position: int
    reason: str
    detail: str          # short, deterministic: an error message or the start of the record

    def to_json(self) -> str:
        return json.dumps(self._asdict(), ensure_ascii=False, sort_keys=True)


def detect_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    for suffix, fmt in ((".txt", "text"), (".text", "text"), (".jsonl", "jsonl"), (".ndjson", "jsonl"),
                        (".json", "jsonl"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return fmt
    raise UserError(f"cannot tell the format of {path!r} from its name; allowed endings: .txt .jsonl .ndjson "
                     ".json .parquet (each optionally .gz). Rename the file.")


class InputFile(NamedTuple):
    path: str            # where to read it: absolute local path or URL
    size: int            # bytes as stored
    key: str             # [SOURCE_ID/]path below its pattern's root; keys the uids


GLOB_CHARS = "*?["


def split_root(pattern: str) -> tuple[str, str]:
    """(root, rest): the pattern's fixed folder part (before the first component with a wildcard; a plain file's
    folder) and the part below it. `data/x.jsonl` -> (`data`, `x.jsonl`); `corpus/*/a.txt` -> (`corpus`, `*/a.txt`)."""
    parts = pattern.split("/")
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS)), len(parts) - 1)
    return "/".join(parts[:fixed]), "/".join(parts[fixed:])


def absolute(pattern: str) -> str:
    """A local path or glob made absolute (URLs as they are): how index.json records an input."""
    return pattern if "://" in pattern else os.path.abspath(pattern)


def pattern_keys(patterns, source_ids=()) -> list[str]:
    """What of each pattern keys the uids: [SOURCE_ID/]the part below its root. Part of the data hash, so a
    dataset's uids and bytes do not depend on where the corpus lies or how its path is spelled."""
    ids = tuple(source_ids) or ("",) * len(patterns)
    return [f"{sid}/{split_root(p)[1]}" if sid else split_root(p)[1] for p, sid in zip(patterns, ids, strict=True)]


def expand_inputs(patterns, source_ids=()) -> list[InputFile]:
    """Every file the patterns match, sorted by path, no duplicates; fails on a pattern matching nothing and on
    two files whose keys would collide."""
    from apache_beam.io.filesystems import FileSystems
    ids = tuple(source_ids) or ("",) * len(patterns)
    if len(ids) != len(patterns):
        raise UserError(f"{len(ids)} --source-id for {len(patterns)} --input; give one per --input, in order, "
                        "or none")
    full = [absolute(p) for p in patterns]   # NOTE: also makes a glob without a folder ('pg_*.jsonl') matchable
    files, owner = {}, {}
    for pattern, given, sid, result in zip(full, patterns, ids, FileSystems.match(full), strict=True):
        if not result.metadata_list:
            where = f" (in {os.path.dirname(pattern)})" if "://" not in pattern else ""
            raise MissingPath(f"--input {given} matches no file{where}; check the path and the file names")
        root = split_root(pattern)[0]
        for md in result.metadata_list:
            detect_format(md.path)
            if md.path in files:
                continue
            rel = md.path[len(root):].lstrip("/") if root else md.path
            key = f"{sid}/{rel}" if sid else rel
            if key in owner:
                raise UserError(f"--input {owner[key]} and {md.path} would both be keyed {key!r} (uids hash a file's "
                                "path below its input's folder); give each --input a --source-id, or one glob over "
                                "their common folder")
            owner[key] = md.path
            files[md.path] = InputFile(md.path, md.size_in_bytes, key)
    return sorted(files.values())


def text_size(path: str, stored: int) -> int:
    """The bytes a reader will go through: a local .gz file's uncompressed size (its gzip trailer, modulo 4 GiB),
    else the size as stored (an estimate for Parquet and remote .gz). For progress totals."""
    if path.endswith(".gz") and "://" not in path and stored >= 18:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return int.from_bytes(f.read(4), "little")
    return stored


def _open(path: str):
    from apache_beam.io.filesystems import CompressionTypes, FileSystems
    return FileSystems.open(path, compression_type=CompressionTypes.AUTO)


def record_bytes(raw: Raw) -> int:
    """The bytes a record took in its file (a text or JSONL line with its line ending): progress counts."""
    if raw.fmt in (UNREADABLE, TOO_LONG):   # no data held (a skipped line's size is only in its reject detail)
        return 0
    if isinstance(raw.data, bytes):
        return len(raw.data) + 1
    return len(raw.data.encode()) if isinstance(raw.data, str) else 1


class TooLong(NamedTuple):
    """Stands for a line or paragraph over max_record_bytes: skipped to its end, never held whole."""
    size: int            # its bytes


class Gunzip:
    """A .gz file decompressed in bounded pieces (Beam's CompressedFile inflates a 16 MiB read at once: a 2 MB
    gzip of zeros becomes 2 GB in one call). Concatenated members are read on; a file that ends before its
    last member's trailer raises EOFError (zlib checks each trailer's CRC-32 and length)."""

    def __init__(self, raw, chunk: int = 1 << 16):
        # NOTE: small compressed reads: the bytes after each member are copied when the next one starts
        self.raw, self.chunk = raw, chunk
        self.d, self.tail, self.started = zlib.decompressobj(31), b"", False

    def read(self, n: int) -> bytes:
        while True:
            if self.d.eof:
                rest = self.d.unused_data or self.raw.read(self.chunk)
                if not rest:
                    return b""
                self.d, self.tail = zlib.decompressobj(31), rest       # the next member
            data = self.tail or self.raw.read(self.chunk)
            if not data:
                if self.started:
                    raise EOFError("compressed file ended before the end-of-stream marker was reached (the .gz "
                                   "is cut short); its last, partial line is not read")
                return b""                                             # an empty file
            self.started = True
            out = self.d.decompress(data, n)
            self.tail = self.d.unconsumed_tail
            if out:
                return out

    def close(self) -> None:
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_lines(path: str):
    """A text or JSONL file as a binary stream, decompressed in bounded pieces when it ends in .gz."""
    from apache_beam.io.filesystems import CompressionTypes, FileSystems
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return Gunzip(raw) if path.lower().endswith(".gz") else raw


def iter_lines(f, chunk: int = 1 << 20, max_bytes: int = 1 << 62) -> Iterator[bytes | TooLong]:
    """Lines of a binary stream without their line ending; a final line without one counts too.

    A line longer than max_bytes is read on to its end but not kept: a TooLong stands for it, so memory stays
    about max_bytes + chunk whatever the input."""
    held: list[bytes] = []       # the pieces of the line not yet ended
    size = 0                     # its bytes so far (also counted once it is no longer kept)

    def line(last: bytes):
        whole = size + len(last)
        if whole > max_bytes:
            return TooLong(whole)
        return (b"".join(held) + last if held else last).removesuffix(b"\r")

    while True:
        buf = f.read(chunk)
        if not buf:
            break
        lines = buf.split(b"\n")
        if len(lines) > 1:
            yield line(lines[0])
            held, size = [], 0
            for whole in lines[1:-1]:
                yield whole.removesuffix(b"\r") if len(whole) <= max_bytes else TooLong(len(whole))
        rest = lines[-1]
        size += len(rest)
        if size <= max_bytes:
            held.append(rest)
        else:
            held = []
    if size:
        yield line(b"")


def _grouped(records, group_bytes: int):
    """(size, position, data) -> (position, group, data): a new group once the current one holds group_bytes."""
    group, used = 0, 0
    for size, position, data in records:
        if used >= group_bytes:
            group, used = group + 1, 0
        used += size
        yield position, group, data


def _read_lines(path, source):
    with _open_lines(path) as f:
        for i, line in enumerate(iter_lines(f, max_bytes=source.max_record_bytes)):
            yield (1 if isinstance(line, TooLong) else len(line) + 1), i, line


def _read_paragraphs(path, source):
    """Blank-line separated blocks; position = line number of the block's first line. A block over
    max_record_bytes is read on to its end but not kept (a TooLong)."""
    limit = source.max_record_bytes
    with _open_lines(path) as f:
        block, start, size = [], 0, 0
        for i, line in enumerate(iter_lines(f, max_bytes=limit)):
            if isinstance(line, TooLong) or line.strip():
                if not block:
                    start, size = i, -1
                size += 1 + (line.size if isinstance(line, TooLong) else len(line))
                if size > limit:
                    block = [TooLong(size)]
                else:
                    block.append(line)
            elif block:
                yield _paragraph(block, start)
                block = []
        if block:
            yield _paragraph(block, start)


def _paragraph(block, start):
    if isinstance(block[0], TooLong):
        return 1, start, block[0]
    data = b"\n".join(block)
    return len(data), start, data


PARQUET_BATCH_BYTES = 16 << 20  # text bytes pyarrow decodes at once, at the row group's mean bytes per row


def _read_parquet(path, source):
    """Row by row, in batches of about PARQUET_BATCH_BYTES. A value over max_record_bytes is a TooLong; a row
    group whose text column holds on average more than max_record_bytes per row (the metadata says so before
    anything is decoded) is all TooLong, unread.

    NOTE: pyarrow decodes a page whole, so one value far over the limit among many small ones in a row group
    is still decoded before it is measured; only the mean per row can be checked beforehand."""
    import pyarrow.parquet as pq
    with _open(path) as f:
        pf = pq.ParquetFile(f)
        if source.text_field not in pf.schema_arrow.names:
            raise UserError(f"{path}: no column {source.text_field!r}; columns: {pf.schema_arrow.names}. "
                             "Pass --text-column NAME.")
        limit, row = source.max_record_bytes, 0
        for g in range(pf.metadata.num_row_groups):
            rows, size = _text_column_size(pf.metadata.row_group(g), source.text_field)
            mean = size / max(rows, 1)
            if mean > limit:
                for _ in range(rows):
                    yield 1, row, TooLong(round(mean))
                    row += 1
                continue
            batch_rows = int(min(4096, max(1, PARQUET_BATCH_BYTES // max(mean, 1))))
            for batch in pf.iter_batches(columns=[source.text_field], batch_size=batch_rows, row_groups=[g]):
                for value in batch.column(0).to_pylist():
                    size = len(value.encode()) if isinstance(value, str) else 1
                    yield size, row, (value if size <= limit else TooLong(size))
                    row += 1


def _text_column_size(row_group, name: str) -> tuple[int, int]:
    """(rows, uncompressed bytes of column `name`) of a row group's metadata."""
    for c in range(row_group.num_columns):
        column = row_group.column(c)
        if column.path_in_schema == name:
            return row_group.num_rows, column.total_uncompressed_size
    return row_group.num_rows, 0


# format -> reader of (size, position, data); text's reader depends on SourceConfig.text_mode
READERS = {"jsonl": _read_lines, "parquet": _read_parquet}
TEXT_READERS = {"line": _read_lines, "paragraph": _read_paragraphs}


def iter_raw_records(path: str, source, key: str | None = None) -> Iterator[Raw]:
    """The file's records (Raw.source = key, default the path); when reading fails part way, a last record of
    format UNREADABLE carries the error (Clean makes it a reject), so what was read is kept and the failure is
    counted, not a crash."""
    fmt = detect_format(path)
    reader = TEXT_READERS[source.text_mode] if fmt == "text" else READERS[fmt]
    position, group, key = -1, 0, key or path
    try:
        for position, group, data in _grouped(reader(path, source), source.group_bytes):
            if isinstance(data, TooLong):
                yield Raw(key, position, group, TOO_LONG, f"{data.size:,} bytes, over --max-record-bytes "
                                                           f"{source.max_record_bytes:,}; not read into memory")
            else:
                yield Raw(key, position, group, fmt, data)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- a damaged file is one reject, not the end of the job
        yield Raw(key, position + 1, group, UNREADABLE, f"the rest of the file was not read: {error_detail(e)}")


def iter_raw_groups(path: str, source, key: str | None = None) -> Iterator[list[Raw]]:
    """The file's records, a list per pack group, in order (groups are consecutive records)."""
    group: list[Raw] = []
    for raw in iter_raw_records(path, source, key):
        if group and raw.group != group[0].group:
            yield group
            group = []
        group.append(raw)
    if group:
        yield group


def _excerpt(data) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else repr(data)
    return text[:80]


def split_text(text: str, max_chars: int) -> list[str]:
    """Pieces of at most max_chars, cut after the last whitespace before the limit when there is one."""
    parts = []
    while len(text) > max_chars:
        cut = max(text.rfind(" ", 0, max_chars), text.rfind("\n", 0, max_chars)) + 1
        cut = cut if cut > max_chars // 2 else max_chars
        parts.append(text[:cut])
        text = text[cut:]
    return parts + [text]


def clean_record(raw: Raw, source) -> list[Doc] | Reject:
    """The document parts of a record, or why it is rejected."""
    def reject(reason, detail):
        return Reject(raw.source, raw.position, reason, detail)

    if raw.fmt in (UNREADABLE, TOO_LONG):
        return reject(raw.fmt, raw.data)
    if raw.fmt == "parquet":
        text = raw.data
        if text is None:
            return reject(MISSING_FIELD, f"column {source.text_field!r} is null")
    else:
        try:
            text = raw.data.decode("utf-8")
        except UnicodeDecodeError as e:
            return reject(INVALID_UTF8, f"{e.reason} at byte {e.start}: {_excerpt(raw.data)}")
        if raw.fmt == "jsonl":
            if not text.strip():
                return reject(EMPTY, "blank line")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                return reject(MALFORMED_JSON, f"{e.msg} at column {e.colno}: {_excerpt(raw.data)}")
            if not isinstance(obj, dict):
                return reject(NOT_AN_OBJECT, f"a JSON {type(obj).__name__}, not an object")
            if source.text_field not in obj:
                return reject(MISSING_FIELD, f"no field {source.text_field!r}; fields: {sorted(obj)[:10]}")
            text = obj[source.text_field]
    if not isinstance(text, str):
        return reject(NON_STRING_FIELD, f"{source.text_field!r} is a {type(text).__name__}: {_excerpt(text)}")
    if not text.strip():
        return reject(EMPTY, "empty or whitespace only")
    return [Doc(raw.source, raw.position, i, raw.group, part)
            for i, part in enumerate(split_text(text, source.max_doc_chars))]


def error_detail(e: BaseException) -> str:
    """An exception as a short, deterministic reject detail: its type and the start of its message."""
    return f"{type(e).__name__}: {str(e)[:120]}"


def clean_group(raws: list[Raw], source) -> tuple[list[Doc], list[Reject]]:
    """clean_record over a pack group: its documents (parts in order) and its rejects.

    No record can stop the job: an exception cleaning one (a 100k-deep nested JSON line raises RecursionError)
    makes it an UNPARSEABLE reject at its position."""
    docs, rejects = [], []
    for raw in raws:
        try:
            out = clean_record(raw, source)
        except Exception as e:  # noqa: BLE001 -- one record's failure is that record's reject
            out = Reject(raw.source, raw.position, UNPARSEABLE, error_detail(e))
        if isinstance(out, Reject):
            rejects.append(out)
        else:
            docs += out
    return docs, rejects
