"""The Beam job's configuration: one frozen dataclass per stage, built from CLI flags in one place.

`PipelineConfig` holds them all and is recorded whole in index.json, local paths made absolute so a rerun
from another folder finds them. `PipelineConfig.data_hash()` covers only what changes the bytes of the output
(the inputs below their roots or --source-id, tokenizer hash, packing, masking, sharding) and keys every uid,
so the output does not depend on where the corpus or output lie, how their paths are spelled, the runner or
the number of workers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from maskstream.errors import UserError
from maskstream.pipeline.dedup import DedupConfig
from maskstream.pipeline.filters import FilterConfig, parse_filters

TEXT_MODES = ("line", "paragraph")     # text files: a document per line, or per blank-line separated block
PACKINGS = ("full", "doc")             # see pipeline/packing.py PACKERS
MASKINGS = ("dynamic", "static")


def _fail(what: str, value, allowed: str, fix: str):
    raise UserError(f"{what}={value!r} is not valid; allowed: {allowed}. {fix}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """Which files to read and how to find the text in them."""
    inputs: tuple[str, ...]            # paths or globs, local or any Beam filesystem (gs://, s3://)
    source_ids: tuple[str, ...] = ()   # one per input, or none: names keying its files' uids (readers.file keys)
    text_field: str = "text"           # JSONL field / Parquet column holding the document
    text_mode: str = "line"            # text files: "line" or "paragraph"
    max_doc_chars: int = 1_000_000     # longer documents are split into parts (then tokenized as one)
    group_bytes: int = 512 * 1024      # consecutive documents of a file form a pack group of about this size
    max_record_bytes: int = 64 << 20   # a longer line (paragraph) is a too_long reject, never held in memory

    def __post_init__(self):
        if not self.inputs:
            _fail("inputs", self.inputs, "one or more paths or globs", "Pass --input PATH (repeatable).")
        if self.source_ids and len(self.source_ids) != len(self.inputs):
            _fail("source_ids", self.source_ids, f"none or one per input ({len(self.inputs)})",
                  "Pass --source-id once per --input, in order.")
        if not self.text_field:
            _fail("text_field", self.text_field, "a field or column name", "Pass --text-field NAME.")
        if self.text_mode not in TEXT_MODES:
            _fail("text_mode", self.text_mode, "|".join(TEXT_MODES), "Pick one with --text-mode.")
        if self.max_doc_chars < 1000:
            _fail("max_doc_chars", self.max_doc_chars, ">= 1000", "Raise --max-doc-chars.")
        if self.group_bytes < 1:
            _fail("group_bytes", self.group_bytes, ">= 1", "Raise --group-bytes.")
        if self.max_record_bytes < 4096:
            _fail("max_record_bytes", self.max_record_bytes, ">= 4096", "Raise --max-record-bytes.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """Which tokenizer (a tokenizer.json file; see `maskstream tokenizer`)."""
    tokenizer: str                     # path as given (local or Beam filesystem)
    tokenizer_sha256: str = ""         # filled in by the launcher; part of the data hash, the path is not

    def __post_init__(self):
        if not self.tokenizer:
            _fail("tokenizer", self.tokenizer, "a tokenizer.json path", "Pass --tokenizer FILE.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PackConfig:
    """How token streams become sequences of exactly seq_len tokens."""
    seq_len: int = 128
    packing: str = "full"              # "full": documents concatenated in a pack group; "doc": never crosses one

    def __post_init__(self):
        if not 8 <= self.seq_len <= 65536:
            _fail("seq_len", self.seq_len, "8..65536", "Pass --seq-len L, e.g. 128 or 512.")
        if self.packing not in PACKINGS:
            _fail("packing", self.packing, "|".join(PACKINGS), "Pick one with --packing.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """Where sequences go: shard count, block size, and static masks."""
    output: str                        # folder or URL prefix
    num_shards: int = 8
    block_bytes: int = 256 * 1024      # token bytes per record (a block of sequences); tar overhead ~4 KiB each
    masking: str = "dynamic"           # "dynamic": the loader masks; "static": K masks stored per sequence
    static_copies: int = 0             # K (static only)
    seed: int = 0

    def __post_init__(self):
        if not self.output:
            _fail("output", self.output, "a folder or URL prefix", "Pass --output DIR.")
        if not 1 <= self.num_shards <= 999_999:
            _fail("num_shards", self.num_shards, "1..999999", "Pass --num-shards N.")
        if self.block_bytes < 1024:
            _fail("block_bytes", self.block_bytes, ">= 1024", "Raise --block-bytes.")
        if self.masking not in MASKINGS:
            _fail("masking", self.masking, "|".join(MASKINGS), "Pick one with --masking.")
        if self.masking == "static" and not 1 <= self.static_copies <= 64:
            _fail("static_copies", self.static_copies, "1..64 with --masking static",
                  "Pass --static-copies K (BERT used 10).")
        if self.masking == "dynamic" and self.static_copies:
            _fail("static_copies", self.static_copies, "0 with --masking dynamic",
                  "Drop --static-copies or pass --masking static.")
        if not 0 <= self.seed < 2**63:
            _fail("seed", self.seed, "0..2**63-1", "Pass --seed N.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """The whole job's configuration, recorded in index.json under "config"."""
    source: SourceConfig
    tokenize: TokenizeConfig
    pack: PackConfig
    shard: ShardConfig
    masking: object          # a MaskingConfig of loader.maskconfig (torch-free), so workers skip torch in dynamic mode
    filters: FilterConfig = FilterConfig()      # quality rules (none by default)
    dedup: DedupConfig = DedupConfig()          # duplicate removal (none by default)
    pmi: object = None       # a pipeline.pmi.PmiConfig with selection pmi, else None

    def to_dict(self) -> dict:
        # NOTE: "pmi" only when set, so the data hash (and every uid) of other datasets stays as it was
        return {"source": dataclasses.asdict(self.source), "tokenize": dataclasses.asdict(self.tokenize),
                "pack": dataclasses.asdict(self.pack), "shard": dataclasses.asdict(self.shard),
                "masking": self.masking.to_dict(), "filters": self.filters.to_dict(),
                "dedup": dataclasses.asdict(self.dedup), **({"pmi": dataclasses.asdict(self.pmi)} if self.pmi else {})}

    def data_hash(self) -> bytes:
        return data_hash(self.to_dict())


def data_hash(config: dict) -> bytes:
    """16 bytes that change whenever the output bytes would; keys the uids. config: PipelineConfig.to_dict()."""
    from maskstream.pipeline.readers import pattern_keys
    d = json.loads(json.dumps(config))
    d["tokenize"].pop("tokenizer")   # the file's sha256 counts, not where it lies
    source = d["source"]             # the inputs below their roots count, not where they lie
    source["inputs"] = pattern_keys(source["inputs"], source.pop("source_ids", ()))
    d["shard"].pop("output")
    # NOTE: the limit on hostile records decides only which lines are too_long rejects (counted, in rejects.jsonl);
    # it changes no byte of a sequence written, so it does not key the uids (and kept datasets keep their bytes)
    d["source"].pop("max_record_bytes", None)
    # NOTE: curation switched off keys nothing, so the uids (and bytes) of a job without it stay as they were
    if not d.get("filters"):
        d.pop("filters", None)
    if d.get("dedup", {}).get("mode", "none") == "none":
        d.pop("dedup", None)
    blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=16).digest()


def config_from_args(args) -> PipelineConfig:
    """The one place where CLI flags become configs (pipeline/run.py's argparse namespace)."""
    from maskstream.loader.maskconfig import MaskingConfig
    from maskstream.pipeline.readers import absolute
    selection = "word" if args.whole_word else args.selection
    masking = MaskingConfig(mask_prob=args.mask_prob, selection=selection)
    pmi = None
    if selection == "pmi":
        from maskstream.pipeline.pmi import PmiConfig
        pmi = PmiConfig(**{k: v for k, v in (("max_n", args.pmi_max_n), ("max_ngrams", args.pmi_max_ngrams),
                                             ("min_count", args.pmi_min_count)) if v is not None})
    return PipelineConfig(
        source=SourceConfig(inputs=tuple(absolute(p) for p in args.input),
                            source_ids=tuple(getattr(args, "source_id", None) or ()), text_field=args.text_field,
                            text_mode=args.text_mode, max_doc_chars=args.max_doc_chars, group_bytes=args.group_bytes,
                            max_record_bytes=args.max_record_bytes),
        tokenize=TokenizeConfig(tokenizer=absolute(args.tokenizer), tokenizer_sha256=args.tokenizer_sha256),
        pack=PackConfig(seq_len=args.seq_len, packing=args.packing),
        shard=ShardConfig(output=args.output, num_shards=args.num_shards, block_bytes=args.block_bytes,
                          masking=args.masking, static_copies=args.static_copies, seed=args.seed),
        masking=masking, filters=parse_filters(args.filters),
        dedup=DedupConfig(mode=args.dedup, ngram=args.minhash_ngram, bands=args.minhash_bands,
                          rows=args.minhash_rows, threshold=args.minhash_threshold), pmi=pmi)
