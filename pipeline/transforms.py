r"""The Beam job's stages: one named PTransform each; expand() only wires, the record logic is elsewhere.

    ReadDocuments -> Clean -> [Filter -> Dedup] -> Tokenize -> Pack -> AssignShards -> WriteShards -> WriteIndex
         \ counts     \ rejects   \ rejects  \ rejects  \ rejects  \ counts              entries /  (rejects.jsonl,
                                                                                                   index.json)
Every stage has one output, a tagged union of (kind, payload): DATA for the next stage, REJECT and STATS for
WriteIndex; `Data()` and `Side()` pick them apart downstream. So the job runs on runners that cannot route a
ParDo's tagged outputs (Beam's DaskRunner), and every branch feeds WriteIndex, the last stage, which a runner
computing only the last stage's lineage still runs whole. The counts come from the data (STATS), not from
Beam metrics, which some runners lack (the counters below are for runners' UIs).

Pack groups (consecutive records of a file) are formed by the reader, which reads a whole file in one call,
so no shuffle is needed to group documents; Tokenize reshuffles the groups only when there are several
workers to spread them over. WriteShards groups sequences by shard (the job's one data shuffle).
`build(p, ...)` applies the whole graph to a pipeline (also a TestPipeline) and returns its PCollections.
"""
from __future__ import annotations

import collections
import os
import typing
from concurrent.futures import Future, ThreadPoolExecutor

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from maskstream.loader.format import token_dtype
from maskstream.pipeline import packing, pmi, pmi_stages, progress, readers, shards
from maskstream.pipeline.tokenizer import TokenizerRef

NS = "maskstream"   # Beam metrics namespace
DATA, REJECT, STATS = "data", "reject", "stats"     # the kinds of a stage's tagged union


def _data(element):
    kind, payload = element
    if kind == DATA:
        yield payload


def _is_side(element) -> bool:
    return element[0] != DATA


class Data(beam.PTransform):
    """A stage's (kind, payload) union -> its DATA payloads, for the next stage."""
    def expand(self, parts):
        return parts | "Data" >> beam.FlatMap(_data)


class Side(beam.PTransform):
    """A stage's (kind, payload) union -> its (REJECT, Reject) and (STATS, dict) elements, for WriteIndex."""
    def expand(self, parts):
        return parts | "Side" >> beam.Filter(_is_side)


# ---- ReadDocuments ----------------------------------------------------------------------------------------

class _ReadFile(beam.DoFn):
    """A whole file in one call, so positions are exact line/row numbers and pack groups are formed here
    (consecutive records), without a shuffle; its counts go to STATS."""
    def __init__(self, source):
        self.source = source
        self.read = Metrics.counter(NS, "documents_read")
        self.bytes = Metrics.counter(NS, "bytes_read")

    def setup(self):
        self.progress = progress.Reporter()   # local runner only: input bytes read, for the launcher's bar

    def process(self, file):
        path, key = file
        n = size = 0
        for group in readers.iter_raw_groups(path, self.source, key):
            n += len(group)
            size += sum(len(r.data) if isinstance(r.data, (bytes, str)) else 1 for r in group)
            self.progress.add(sum(readers.record_bytes(r) for r in group))
            yield DATA, ((key, group[0].group), group)
        self.read.inc(n)
        self.bytes.inc(size)
        yield STATS, {"documents_read": n, "bytes_read": size, "files": 1}


class ReadDocuments(beam.PTransform):
    """Matched input files (path, key) -> DATA ((key, group), [Raw]) pack groups of records; STATS per-file
    counts."""
    def __init__(self, files: list[str], source):
        super().__init__()
        self.files, self.source = files, source

    def expand(self, pbegin):
        return (pbegin
                | "Files" >> beam.Create(self.files)        # NOTE: Create reshuffles: files spread over workers
                | "ReadFile" >> beam.ParDo(_ReadFile(self.source)))


# ---- Clean ------------------------------------------------------------------------------------------------

@beam.typehints.with_output_types(typing.Tuple[str, typing.Any])
class _Clean(beam.DoFn):
    def __init__(self, source):
        self.source = source
        self.rejected = {r: Metrics.counter(NS, f"rejected_{r}") for r in readers.REASONS}

    def process(self, element):
        key, raws = element
        docs, rejects = readers.clean_group(raws, self.source)
        for r in rejects:
            self.rejected[r.reason].inc()
            yield REJECT, r
        if docs:
            yield DATA, (key, docs)


class Clean(beam.PTransform):
    """((source, group), [Raw]) -> DATA ((source, group), [Doc]) of valid documents; REJECT with a reason."""
    def __init__(self, source):
        super().__init__()
        self.source = source

    def expand(self, records):
        return records | "Validate" >> beam.ParDo(_Clean(self.source))


AHEAD = 2   # batches in flight in one-process mode: one's Python parts overlap another's encode (-0.05 s on SOTU)


# ---- Tokenize ---------------------------------------------------------------------------------------------

@beam.typehints.with_output_types(typing.Tuple[str, typing.Any])
class _Tokenize(beam.DoFn):
    """Pack groups buffered up to batch_chars, then one encode call for all of them; the tokenizer is built
    once per worker, from its JSON text. threads (the one-process local mode): the tokenizer's Rust thread
    pool uses every core, and batches are encoded on AHEAD helper threads while this one reads, packs and
    shuffles the groups around them (the tokenizer releases the GIL); otherwise one thread, as each worker
    process is one core."""
    def __init__(self, tokenizer: TokenizerRef, *, threads: bool = False, batch_chars: int = 2 << 20):
        self.tokenizer, self.threads, self.batch_chars = tokenizer, threads, batch_chars
        self.rejected = {r: Metrics.counter(NS, f"rejected_{r}") for r in (readers.NO_TOKENS, readers.TOKENIZE_ERROR)}

    def setup(self):
        # NOTE: in worker processes Rust threads would fight over the cores the other workers use.
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if self.threads else "false"
        from maskstream.pipeline.encoder import Encoder
        from maskstream.pipeline.tokenizer import tokenizer_from_json
        self.encoder = Encoder(tokenizer_from_json(self.tokenizer.text()))
        self.ahead = ThreadPoolExecutor(AHEAD, thread_name_prefix="tokenize") if self.threads else None

    def teardown(self):
        if getattr(self, "ahead", None) is not None:
            self.ahead.shutdown()

    def start_bundle(self):
        self.buffer, self.buffered, self.pending = [], 0, collections.deque()
        self.limit = self.batch_chars // 8      # doubles per batch: the cores start work after the first group

    def process(self, element):
        key, docs = element
        self.buffer.append((key, docs))
        self.buffered += sum(len(d.text) for d in docs)
        if self.buffered >= self.limit:
            self.limit = min(2 * self.limit, self.batch_chars)
            yield from self._flush(lambda x: x)

    def finish_bundle(self):
        yield from self._flush(GlobalWindows.windowed_value, last=True)   # NOTE: outputs here need a window

    def _flush(self, wrap, *, last: bool = False):
        """Start encoding the buffer; emit the oldest batches until AHEAD are in flight (none when last)."""
        if self.buffer:
            batch = (self.buffer, self.buffered)
            self.pending.append(self.ahead.submit(self._encode, *batch) if self.ahead else _done(self._encode(*batch)))
            self.buffer, self.buffered = [], 0
        while len(self.pending) > (0 if last or self.ahead is None else AHEAD):
            buffer, results, done = self.pending.popleft().result()
            for (key, _), (tokdocs, rejects) in zip(buffer, results, strict=False):
                for r in rejects:
                    self.rejected[r.reason].inc()
                    yield wrap((REJECT, r))
                if tokdocs:
                    yield wrap((DATA, (key, tokdocs)))

    def _encode(self, buffer, done):
        return buffer, tokenize_or_reject(self.encoder, [docs for _, docs in buffer]), done


def tokenize_or_reject(encoder, groups):
    """packing.tokenize_groups, where a document the tokenizer raises on becomes a TOKENIZE_ERROR reject (all
    its parts) instead of stopping the job; the others are tokenized as usual. The batch is retried per
    document only after it fails, so the common path stays one encode call."""
    try:
        return packing.tokenize_groups(encoder, groups)
    except Exception:  # noqa: BLE001 -- found and rejected document by document below
        return [_tokenize_group_or_reject(encoder, docs) for docs in groups]


def _tokenize_group_or_reject(encoder, docs):
    bad = {}
    for d in docs:
        if (d.source, d.position) not in bad:
            try:
                encoder.encode([d.text])
            except Exception as e:  # noqa: BLE001 -- this document's failure is its reject
                bad[d.source, d.position] = readers.Reject(d.source, d.position, readers.TOKENIZE_ERROR,
                                                           readers.error_detail(e))
    ok = [d for d in docs if (d.source, d.position) not in bad]
    tokdocs, rejects = packing.tokenize_groups(encoder, [ok])[0] if ok else ([], [])
    return tokdocs, rejects + list(bad.values())


def _done(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


class Tokenize(beam.PTransform):
    """((source, group), [Doc]) -> DATA ((source, group), [TokDoc]), many groups per encode call; REJECT.

    Without threads the groups are first spread over the workers (a file is read by one worker); with
    threads (one process) there is nothing to spread, and the shuffle's copy of the corpus is skipped."""
    def __init__(self, tokenizer: TokenizerRef, *, threads: bool = False):
        super().__init__()
        self.tokenizer, self.threads = tokenizer, threads

    def expand(self, groups):
        if not self.threads:
            groups = groups | "Spread" >> beam.Reshuffle()
        return groups | "Encode" >> beam.ParDo(_Tokenize(self.tokenizer, threads=self.threads))


# ---- Pack, AssignShards -----------------------------------------------------------------------------------

class _Pack(beam.DoFn):
    def __init__(self, pack_cfg, info, key: bytes):
        self.pack_cfg, self.info, self.key = pack_cfg, info, key
        self.counters = {n: Metrics.counter(NS, n) for n in ("documents_written", "sequences", "tokens")}
        self.units = None   # (vocabulary, its pmi.Matcher), built once per worker

    def process(self, element, vocabulary=None):
        _, tokdocs = element
        if vocabulary is not None and (self.units is None or self.units[0] is not vocabulary):
            self.units = vocabulary, pmi.Matcher(vocabulary)
        batch, stats = packing.pack_group(tokdocs, packing=self.pack_cfg.packing, seq_len=self.pack_cfg.seq_len,
                                          info=self.info, key=self.key, dtype=token_dtype(self.info.vocab_size),
                                          units=self.units[1] if vocabulary is not None else None)
        for name, counter in self.counters.items():
            counter.inc(stats[name])
        yield DATA, batch
        yield STATS, stats


class Pack(beam.PTransform):
    """Tokenized groups -> DATA SeqBatch of exactly-L sequences with uids (and, given a PMI vocabulary, unit
    starts); STATS per-group counts."""
    def __init__(self, pack_cfg, info, key: bytes, vocabulary=None):
        super().__init__()
        self.pack_cfg, self.info, self.key, self.vocabulary = pack_cfg, info, key, vocabulary

    def expand(self, tokdocs):
        side = {} if self.vocabulary is None else {"vocabulary": beam.pvalue.AsSingleton(self.vocabulary)}
        return tokdocs | "PackGroup" >> beam.ParDo(_Pack(self.pack_cfg, self.info, self.key), **side)


class AssignShards(beam.PTransform):
    """SeqBatch -> (shard, SeqBatch): shard = hash(uid) % num_shards."""
    def __init__(self, num_shards: int):
        super().__init__()
        self.num_shards = num_shards

    def expand(self, batches):
        n = self.num_shards
        return batches | "SplitByShard" >> beam.FlatMap(packing.split_by_shard, n).with_output_types(
            typing.Tuple[int, typing.Any])


# ---- WriteShards, WriteRejects, WriteIndex ----------------------------------------------------------------

class _WriteShard(beam.DoFn):
    def __init__(self, config, info):
        # only plain pieces travel to workers: MaskingConfig would import torch, needed in static mode only
        self.shard_cfg, self.seq_len, self.info = config.shard, config.pack.seq_len, info
        self.masking = config.masking.to_dict() if config.shard.masking == "static" else None
        self.written = Metrics.counter(NS, "shards_written")
        self.bytes = Metrics.counter(NS, "shard_bytes")

    def process(self, element):
        shard, batches = element
        entry = shards.write_shard(self.shard_cfg.output, shard, list(batches), shard_cfg=self.shard_cfg,
                                   masking=self.masking, info=self.info, seq_len=self.seq_len,
                                   dtype=token_dtype(self.info.vocab_size))
        self.written.inc()
        self.bytes.inc(entry["bytes"])
        yield entry


class WriteShards(beam.PTransform):
    """(shard, SeqBatch) -> one tar per shard (temporary name, then renamed) -> its index.json entry."""
    def __init__(self, config, info):
        super().__init__()
        self.config, self.info = config, info

    def expand(self, keyed):
        return (keyed
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteTar" >> beam.ParDo(_WriteShard(self.config, self.info)))


class _Gather(beam.CombineFn):
    """(kind, payload) -> {"entry": [...], REJECT: [...], STATS: {summed}}; partial sums on each worker."""
    def create_accumulator(self):
        return {"entry": [], REJECT: [], STATS: {}}

    def add_input(self, acc, element):
        kind, payload = element
        if kind == STATS:
            acc["stats"] = shards.sum_stats([acc["stats"], payload])
        else:
            acc[kind].append(payload)
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        return {"entry": [e for a in accs for e in a["entry"]], "reject": [r for a in accs for r in a["reject"]],
                "stats": shards.sum_stats(a["stats"] for a in accs)}

    def extract_output(self, acc):
        return acc


def _finish(gathered, *, config: dict, info, inputs, tokenizer: TokenizerRef, units: dict | None = None) -> dict:
    """Write rejects.jsonl and the tokenizer, check that every document is accounted for, then index.json.

    NOTE: when no document was written there is no index.json: a 0-sequence folder must not look like a
    dataset; the runner reports the rejects instead (run.no_documents_written)."""
    output = config["shard"]["output"]
    by_reason = shards.write_rejects(output, gathered["reject"])
    shards.write_tokenizer(output, tokenizer.text())
    if units is not None:   # the PMI vocabulary (pipeline/pmi.py), listed in index.json with its sha256
        shards.write_units(output, pmi.vocabulary_bytes(units))
    stats = dict(gathered["stats"])
    index = shards.build_index(entries=gathered["entry"], stats=stats, documents_read=stats.pop("documents_read", 0),
                               rejects_by_reason=by_reason, config=config, info=info, inputs=inputs,
                               units=None if units is None else pmi.index_entry(units))
    if index["counts"].get("documents_written", 0) == 0:
        return index
    shards.write_index(output, index)
    return index


class WriteIndex(beam.PTransform):
    """Shard entries, rejects and counts -> rejects.jsonl and tokenizer.json, then index.json, once every shard
    is written."""
    def __init__(self, config, info, inputs, tokenizer: TokenizerRef, vocabulary=None):
        super().__init__()
        self.config, self.info, self.inputs = config.to_dict(), info, inputs   # a plain dict: no torch import
        self.tokenizer, self.vocabulary = tokenizer, vocabulary

    def expand(self, parts):
        # NOTE: CombineGlobally waits for its whole input, so index.json is written after the last shard.
        side = {} if self.vocabulary is None else {"units": beam.pvalue.AsSingleton(self.vocabulary)}
        return (parts
                | "Gather" >> beam.CombineGlobally(_Gather()).without_defaults()   # never empty: STATS per file
                | "Write" >> beam.Map(_finish, config=self.config, info=self.info, inputs=self.inputs,
                                      tokenizer=self.tokenizer, **side))


def build(p, *, config, info, tokenizer_json: str, inputs: list[tuple[str, int]], threads: bool = False,
          tokenizer_path: str | None = None) -> dict:
    """Apply the whole job to pipeline p; returns its PCollections by name (for tests and the runner).

    threads: the job runs in one process (local in_memory mode), so the tokenizer may use every core.
    tokenizer_path: where workers can read tokenizer_json themselves (the local runner); None: carried inline."""
    from maskstream.pipeline.curation import curate
    tokenizer = TokenizerRef.of(tokenizer_json, path=tokenizer_path)
    read = p | "ReadDocuments" >> ReadDocuments([(f.path, f.key) for f in inputs], config.source)
    clean = read | "Records" >> Data() | "Clean" >> Clean(config.source)
    docs, curated = curate(clean | "Docs" >> Data(), config)
    tok = docs | "Tokenize" >> Tokenize(tokenizer, threads=threads)
    tokdocs = tok | "TokDocs" >> Data()
    vocabulary = None if config.pmi is None else tokdocs | "FindUnits" >> pmi_stages.FindUnits(config.pmi)
    packed = tokdocs | "Pack" >> Pack(config.pack, info, config.data_hash(), vocabulary)
    sequences = packed | "Sequences" >> Data()
    entries = (sequences
               | "AssignShards" >> AssignShards(config.shard.num_shards)
               | "WriteShards" >> WriteShards(config, info))
    parts = [entries | "TagEntries" >> beam.Map(lambda e: ("entry", e)),
             read | "ReadCounts" >> Side(),
             clean | "CleanRejects" >> Side(),
             *curated,
             tok | "TokenizeRejects" >> Side(),
             packed | "PackCounts" >> Side()]
    index = parts | "Flatten" >> beam.Flatten() | "WriteIndex" >> WriteIndex(config, info, inputs, tokenizer,
                                                                             vocabulary)
    return {"docs": docs, "sequences": sequences, "entries": entries, "index": index}
