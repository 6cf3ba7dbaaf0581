"""`maskstream preprocess` / `python -m maskstream.pipeline.run`: parse -> configs -> Beam job -> summary.

Flags of maskstream are parsed here; every other flag goes to Beam's PipelineOptions, so
`--runner=DataflowRunner --project P --region R --temp_location gs://...` just works. Without --runner the job
runs on the local FnApiRunner (what DirectRunner picks for batch jobs), built directly so no Prism binary is
downloaded, in one of two modes (`--local-mode`; Beam's `--direct_running_mode`, when given, wins):
  in_memory         one process; Tokenize lets the tokenizer's Rust thread pool use every core and encodes
                    many pack groups per call; groups go from the reader to the tokenizer without a shuffle.
  multi_processing  a Beam worker process per core (`--direct_num_workers`), one tokenizer thread each;
                    pack groups are reshuffled so the workers share a file.
  auto (default)    in_memory on up to AUTO_IN_MEMORY_CORES cores or for inputs up to AUTO_IN_MEMORY_BYTES
                    (file sizes as stored), else multi_processing. Measured on 2 cores (SOTU, 10.8 MB of
                    text): in_memory 2.0-2.7 s end to end, multi_processing 6 s, of which ~3 s start the
                    workers (each imports Beam) and ~1 s stops them.
                    The byte threshold for more cores is an estimate (tokenizing ~1.8 MB/s per core either
                    way, ~0.04 s/MB of serial Python in one process against ~4 s to start workers).
The output is byte-identical in every mode (tests compare them). `multi_threading` mode is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time

from maskstream.errors import UserError
from maskstream.flags import Parser
from maskstream.loader.maskconfig import SELECTIONS
from maskstream.pipeline.config import MASKINGS, PACKINGS, TEXT_MODES, config_from_args
from maskstream.pipeline.dask_runner import dask_runner, is_dask, register_options
from maskstream.pipeline.dedup import DEDUP_MODES, DedupConfig
from maskstream.pipeline.local_runner import hidden_packages, local_runner, logging_disabled
from maskstream.pipeline.tokenizer import load_tokenizer

LOCAL_RUNNERS = (None, "DirectRunner", "direct", "FnApiRunner")
LOCAL_MODES = ("auto", "in_memory", "multi_processing")
AUTO_IN_MEMORY_CORES = 2               # auto: one process with Rust threads up to this many cores ...
AUTO_IN_MEMORY_BYTES = 64 << 20        # ... or for inputs up to this size on more cores


def parser(cls=Parser) -> argparse.ArgumentParser:
    """The flags of maskstream; `cls` lets the Python API (maskstream.api) raise where the CLI prints usage."""
    # NOTE: each hyphenated flag also has an underscore spelling, the form Dataflow flex templates pass.
    p = cls(prog="maskstream preprocess", description=__doc__.split("\n")[0],
            epilog="Unknown flags go to Beam's PipelineOptions (e.g. --runner, --project).")
    p.add_argument("--input", action="extend", nargs="+", required=True,
                   help="file or glob, local or gs:// s3:// (repeatable); .txt .jsonl .parquet, optionally .gz")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (see `maskstream tokenizer`)")
    p.add_argument("--output", required=True, help="output folder or URL prefix")
    p.add_argument("--source-id", "--source_id", action="append", default=None, metavar="ID",
                   help="a name keying the uids of one --input's files, once per --input in order (default: each "
                        "file's path below its input's folder, so the bytes do not depend on where the corpus lies)")
    p.add_argument("--text-field", "--text-column", "--text_field", "--text_column", dest="text_field", default="text",
                   help="JSONL field / Parquet column holding the text")
    p.add_argument("--text-mode", "--text_mode", choices=TEXT_MODES, default="line",
                   help="text files: a document per line, or per blank-line separated paragraph")
    p.add_argument("--seq-len", "--seq_len", type=int, default=128,
                   help="tokens per sequence, the tokenizer's specials included")
    p.add_argument("--packing", choices=PACKINGS, default="full",
                   help="full: documents concatenated (RoBERTa); doc: a sequence never crosses a document")
    p.add_argument("--masking", choices=MASKINGS, default="dynamic",
                   help="dynamic: the loader masks every epoch; static: K masks stored per sequence")
    p.add_argument("--static-copies", "--static_copies", type=int, default=None,
                   help="K, with --masking static (default 10)")
    p.add_argument("--mask-prob", "--mask_prob", type=float, default=0.15,
                   help="share of tokens masked (recorded in index.json; used for static masks)")
    p.add_argument("--selection", choices=SELECTIONS, default="token",
                   help="what a mask covers: single tokens, whole words, spans of words, or pmi: PMI n-grams "
                        "whole (Levine et al. 2021), found by the job (see --pmi-*)")
    p.add_argument("--pmi-max-ngrams", "--pmi_max_ngrams", type=int, default=None,
                   help="--selection pmi: most n-grams kept, half of them bigrams (default 20000)")
    p.add_argument("--pmi-min-count", "--pmi_min_count", type=int, default=None,
                   help="--selection pmi: n-grams seen fewer times are not scored (default 10)")
    p.add_argument("--pmi-max-n", "--pmi_max_n", type=int, default=None,
                   help="--selection pmi: longest n-gram in words (default 5)")
    p.add_argument("--whole-word", "--whole_word", action="store_true", help="same as --selection word")
    p.add_argument("--seed", type=int, default=0, help="keys the static masks")
    p.add_argument("--num-shards", "--num_shards", type=int, default=8, help="shard files to write")
    p.add_argument("--block-bytes", "--block_bytes", type=int, default=256 * 1024, help="token bytes per tar record")
    p.add_argument("--max-doc-chars", "--max_doc_chars", type=int, default=1_000_000,
                   help="longer documents are split into parts before tokenizing (never a crash)")
    p.add_argument("--max-record-bytes", "--max_record_bytes", type=int, default=64 << 20,
                   help="a longer line (or paragraph) of a text/JSONL file is a too_long reject, skipped without "
                        "being held in memory (default 64 MiB)")
    p.add_argument("--group-bytes", "--group_bytes", type=int, default=512 * 1024,
                   help="consecutive documents of about this many bytes form a pack/tokenize group")
    p.add_argument("--local-mode", "--local_mode", choices=LOCAL_MODES, default="auto",
                   help="local runner only: in_memory (one process, the tokenizer's Rust threads on every core), "
                        "multi_processing (a Beam worker process per core), or auto (see the module doc)")
    p.add_argument("--filters", default="none",
                   help="quality rules: a preset (gopher) and/or rule names, rule.setting=value, -rule; e.g. "
                        "gopher,word_count.min=20,-bullet_lines (default: none). See pipeline/filters.py")
    p.add_argument("--dedup", choices=DEDUP_MODES, default="none",
                   help="drop duplicates: exact (normalized text) or minhash (exact, then near-duplicates); "
                        "the smallest (file, line) copy is kept, the others go to rejects")
    p.add_argument("--minhash-ngram", "--minhash_ngram", type=int, default=DedupConfig.ngram,
                   help="words per shingle (characters for CJK text)")
    p.add_argument("--minhash-bands", "--minhash_bands", type=int, default=DedupConfig.bands)
    p.add_argument("--minhash-rows", "--minhash_rows", type=int, default=DedupConfig.rows)
    p.add_argument("--minhash-threshold", "--minhash_threshold", type=float, default=DedupConfig.threshold,
                   help="candidates are dropped at estimated Jaccard similarity >= this")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --output holds when it is another dataset or holds files not its own")
    return p


def parse(argv, *, parser_class=Parser) -> tuple[argparse.Namespace, list[str]]:
    p = parser(parser_class)
    args, beam_args = p.parse_known_args(argv)
    if args.whole_word and args.selection != "token":
        p.error(f"--whole-word contradicts --selection {args.selection}; pass one of them")
    given = [f for f in ("pmi_max_ngrams", "pmi_min_count", "pmi_max_n") if getattr(args, f) is not None]
    if given and args.selection != "pmi":
        p.error(f"--{given[0].replace('_', '-')} applies to --selection pmi only; add it or drop the flag")
    if args.static_copies is None:
        args.static_copies = 10 if args.masking == "static" else 0
    return args, beam_args


def check_beam_flags(beam_args: list[str]) -> None:
    """Refuse a flag that neither maskstream nor any of Beam's PipelineOptions defines (a typo would else be
    dropped silently by Beam), suggesting the closest known spelling."""
    import difflib
    import importlib.util

    from apache_beam.options.pipeline_options import PipelineOptions
    register_options()      # Beam defines DaskOptions only once its Dask runner is imported
    beam = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=beam.append)   # Beam's own parser, all its flags

    def refuse(message):
        raise UserError(f"{message} (a Beam pipeline option)")
    beam[0].error = refuse        # argparse would print Beam's whole usage and exit
    _, unknown = beam[0].parse_known_args(beam_args)
    flags = [a.split("=", 1)[0] for a in unknown if a.startswith("-") and a != "--"]
    if not flags:
        return
    if flags[0].startswith("--dask") and importlib.util.find_spec("distributed") is None:
        raise UserError(f"{flags[0]} needs Beam's Dask runner, which needs dask.distributed; "
                        "install maskstream[dask] (pip install 'maskstream[dask]')")
    # maskstream's flags by their first (hyphenated) spelling, then Beam's; matched ignoring - versus _
    known = [a.option_strings[0] for a in parser()._actions if a.option_strings[0].startswith("--")]
    known += [o for a in beam[0]._actions for o in a.option_strings if o.startswith("--")]
    norm = {k.replace("_", "-"): k for k in reversed(known)}
    close = difflib.get_close_matches(flags[0].replace("_", "-"), list(norm), n=1, cutoff=0.6)
    hint = f" (did you mean {norm[close[0]]}?)" if close else \
        "; see `maskstream preprocess --help` and Beam's pipeline options"
    raise UserError(f"unknown flag {flags[0]}{hint}")


def auto_mode(cores: int, input_bytes: int) -> str:
    """The local execution mode that measured faster (see the module doc for the figures)."""
    if cores <= AUTO_IN_MEMORY_CORES or input_bytes <= AUTO_IN_MEMORY_BYTES:
        return "in_memory"
    return "multi_processing"


def pipeline_options(beam_args: list[str], *, local_mode: str = "auto", input_bytes: int = 0, files: int = 1):
    """PipelineOptions and, for the local default and Dask, the runner object to use (None: Beam picks --runner).

    On Dask the input files are spread over `files` partitions unless --dask_npartitions or
    --dask_partition_size says otherwise (Beam's default puts up to 128 files in one partition, one worker).

    Beam's own --direct_running_mode, when given, wins over --local-mode (they must not contradict)."""
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, SetupOptions, StandardOptions
    options = PipelineOptions(beam_args)
    options.view_as(SetupOptions).save_main_session = False
    if is_dask(options.view_as(StandardOptions).runner):
        from apache_beam.runners.dask.dask_runner import DaskOptions
        dask = options.view_as(DaskOptions)
        if dask.npartitions is None and dask.partition_size is None:
            dask.npartitions = max(files, 1)
        return options, dask_runner()
    if options.view_as(StandardOptions).runner not in LOCAL_RUNNERS:
        return options, None
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_threading":
        raise UserError("--direct_running_mode=multi_threading was seen to drop elements; use "
                         "multi_processing or in_memory (or leave it out: --local-mode auto picks)")
    cores = len(os.sched_getaffinity(0))
    if any(a.startswith("--direct_running_mode") for a in beam_args):
        if local_mode not in ("auto", direct.direct_running_mode):
            raise UserError(f"--local-mode {local_mode} contradicts --direct_running_mode="
                             f"{direct.direct_running_mode}; pass one of them")
    else:
        direct.direct_running_mode = auto_mode(cores, input_bytes) if local_mode == "auto" else local_mode
    if direct.direct_running_mode == "multi_processing" and \
            not any(a.startswith("--direct_num_workers") for a in beam_args):
        direct.direct_num_workers = cores
    return options, local_runner(options)


def prepare(args):
    """Configs, tokenizer facts and the input file list: everything the graph needs, checked up front."""
    from maskstream.pipeline.readers import expand_inputs
    tok, info, text = load_tokenizer(args.tokenizer)
    args.tokenizer_sha256 = info.sha256
    config = config_from_args(args)
    if config.pack.seq_len <= len(info.prefix) + len(info.suffix):
        raise UserError(f"--seq-len {config.pack.seq_len} leaves no room between the tokenizer's specials; "
                        "pass a larger --seq-len, e.g. 128")
    inputs = expand_inputs(config.source.inputs, config.source.source_ids)
    return config, info, text, inputs


def summary(index: dict, seconds: float) -> str:
    c = index["counts"]
    total = sum(s["bytes"] for s in index["shards"])
    rejects = ", ".join(f"{k} {v}" for k, v in c["rejects_by_reason"].items()) or "none"
    mb = c.get("bytes_read", 0) / 1e6
    return "\n".join([
        f"documents  read {c['documents_read']:,}  written {c['documents_written']:,}  "
        f"rejected {c['documents_rejected']:,} ({rejects})",
        f"sequences  {c['sequences']:,} of {index['seq_len']} ({c.get('tail_sequences', 0):,} padded tails), "
        f"tokens {c['tokens']:,} ({c.get('pad_tokens', 0):,} padding)",
        f"shards     {len(index['shards'])} ({c.get('empty_shards', 0)} empty), {total / 1e6:.2f} MB, "
        f"{total / max(c['tokens'], 1):.3f} bytes/token",
        f"speed      {mb:.1f} MB of text in {seconds:.1f} s = {mb / max(seconds, 1e-9):.2f} MB/s",
    ])


def no_documents_written(folder: str, output: str) -> UserError:
    """The error of a run that wrote no document (and so no index.json): how many were rejected, why, where.

    folder: where its rejects file lies (OUT, or the run's staging folder when OUT holds a dataset it keeps)."""
    import collections

    from maskstream.pipeline import shards, store
    from maskstream.pipeline.readers import REASONS, Reject
    path = shards.join(folder, shards.REJECTS_DIR, shards.REJECTS_FILE)
    rejects = [Reject(**json.loads(line)) for line in store.read(path).decode().splitlines() if line]
    if not rejects:
        return UserError("no document was read: the inputs hold no records; check --input (and --text-mode)")
    counts = collections.Counter(r.reason for r in rejects)
    by_reason = ", ".join(f"{reason} {counts[reason]:,}" for reason in REASONS if counts[reason])
    kept = "" if folder == output else f" ({output} keeps its dataset; the next run removes this folder)"
    return UserError(f"no document was written: all {len(rejects):,} rejected ({by_reason}); no index.json was "
                     f"written. See {path}{kept} for each reject's file, line (or Parquet row) and reason; "
                     "check --input and --text-field")


def run_job(args, beam_args, config, info, text, inputs):
    """Build the graph for config (its output: where this job writes) and run it to the end."""
    import apache_beam as beam

    from maskstream.pipeline import progress, transforms
    options, runner = pipeline_options(beam_args, local_mode=args.local_mode,
                                       input_bytes=sum(f.size for f in inputs), files=len(inputs))
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions
    on_dask = is_dask(options.view_as(StandardOptions).runner)
    local = runner is not None and not on_dask
    threads = local and options.view_as(DirectOptions).direct_running_mode == "in_memory"
    p = beam.Pipeline(runner=runner, options=options) if runner else beam.Pipeline(options=options)
    local_path = os.path.abspath(args.tokenizer) if "://" not in args.tokenizer else args.tokenizer
    transforms.build(p, config=config, info=info, tokenizer_json=text, inputs=inputs, threads=threads,
                     tokenizer_path=local_path if local else None)   # local workers read it themselves
    from maskstream.pipeline.readers import text_size
    with progress.Bar(sum(text_size(f.path, f.size) for f in inputs), enabled=local and not args.quiet,
                      desc="read"):
        # NOTE: on Dask, Beam's default round trip through the runner API (every transform pickled, bz2'd and
        # rebuilt; the job runs from Python objects either way) took 12 of 18 s on 3 documents
        result = p.run(test_runner_api=False if on_dask else "AUTO")
        result.wait_until_finish()


def builds_only(beam_args) -> bool:
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, TestOptions
    options = PipelineOptions(beam_args)
    return bool(options.view_as(TestOptions).dry_run or options.view_as(GoogleCloudOptions).template_location)


def run(argv=None, *, swap: bool | None = None, parser_class=Parser) -> dict:
    """Run the job into a staging folder and put the verified dataset in place; returns its index.json dict.

    swap: None picks (see pipeline/staging.py); False forces the in-place commit (tests)."""
    import dataclasses

    from maskstream.pipeline import shards, staging, store
    argv = sys.argv[1:] if argv is None else argv
    args, beam_args = parse(argv, parser_class=parser_class)
    check_beam_flags(beam_args)
    config, info, text, inputs = prepare(args)
    output = config.shard.output
    staging.refuse_inputs_inside(output, [f.path for f in inputs])      # before anything is touched
    if builds_only(beam_args):      # nothing runs: touch nothing, but refuse what a real run would refuse
        shards.check_output(output, config.to_dict(), overwrite=args.overwrite)
        run_job(args, beam_args, config, info, text, inputs)
        print("graph built and checked; nothing was run (--dry_run / --template_location)", file=sys.stderr)
        return {}
    run_id = staging.new_run_id()
    with staging.Lock(output, ["maskstream preprocess", *argv], run_id) as lock:
        layout = staging.plan(output, run_id, swap=swap)
        removed = staging.clean_leftovers(layout)
        if removed and not args.quiet:
            print(f"preprocess: removed what killed runs left: {', '.join(removed)}", file=sys.stderr, flush=True)
        foreign = shards.check_output(output, config.to_dict(), overwrite=args.overwrite)
        start = time.perf_counter()
        if not args.quiet:
            print(f"preprocess: {len(inputs)} file(s), {sum(f.size for f in inputs) / 1e6:.1f} MB -> {output}",
                  file=sys.stderr, flush=True)
        job = dataclasses.replace(config, shard=dataclasses.replace(config.shard, output=layout.staging))
        try:
            run_job(args, beam_args, job, info, text, inputs)
            index = staging.finalize_index(layout)
        except BaseException:
            store.remove_tree(layout.staging)         # a failed run leaves OUT as it was
            raise
        if index is None:                             # see transforms._finish: no index.json without documents
            if store.exists(shards.join(output, "index.json")):
                raise no_documents_written(layout.staging, output)
            staging.commit(layout, foreign)           # nothing to replace: the rejects go to OUT, as the report says
            raise no_documents_written(output, output)
        if not lock.held():
            store.remove_tree(layout.staging)
            raise UserError(f"--output {output}: another run took the lock while this one ran; its dataset was "
                            "not put in place")
        staging.commit(layout, foreign)
    if not args.quiet:
        print(summary(index, time.perf_counter() - start), file=sys.stderr, flush=True)
    return index


# NOTE: Beam imports every optional library it finds installed (apache-beam[gcp] brings ~400 modules: BigQuery,
# Pub/Sub, Dataflow, GCS, auth; MongoDB and pyarrow come with Beam itself): 0.4-0.6 s of a 3 s SOTU job. A run on
# the local runner with local files needs no cloud client, and one without Parquet inputs no pyarrow, so for
# such runs they look uninstalled, which Beam handles as on a lean install (it skips those connectors).
CLOUD_CLIENTS = ("apache_beam.io.gcp", "google.cloud", "google.api_core", "google.auth", "google.pubsub_v1",
                 "apitools", "oauth2client", "pymongo", "bson")
NOT_PARQUET = re.compile(r"\.(txt|jsonl|json)(\.gz)?$")


def unneeded_packages(argv) -> tuple[str, ...]:
    """Packages a run does without: the cloud clients on the local runner with local inputs, tokenizer and output;
    pyarrow too when every input is named as text or JSONL."""
    args, beam_args = parse(argv)
    runner = argparse.ArgumentParser(add_help=False)
    runner.add_argument("--runner")
    paths = [*args.input, args.tokenizer, args.output]
    if runner.parse_known_args(beam_args)[0].runner not in LOCAL_RUNNERS or any("://" in p for p in paths):
        return ()
    return CLOUD_CLIENTS + (("pyarrow",) if all(NOT_PARQUET.search(i) for i in args.input) else ())


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # multi-process workers relay their start-up warnings (no semi_persistent_directory, discarded args)
    # through the local job service: noise to a user; real failures still surface as errors
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
    import gc
    argv = sys.argv[1:] if argv is None else argv
    skip = unneeded_packages(argv)
    with hidden_packages(skip):
        # Beam's warnings that a skipped connector is unavailable
        with logging_disabled(logging.WARNING) if skip else contextlib.nullcontext():
            import apache_beam  # noqa: F401
            from apache_beam.runners.portability.fn_api_runner import fn_runner  # noqa: F401
        # NOTE: the ~160k objects of Beam's modules never die; frozen, the collector stops walking them in every
        # full collection and at exit (0.5 s of a 6 s SOTU run). Only here, in a one-job process: not in run().
        gc.freeze()
        run(argv)
    return 0


if __name__ == "__main__":
    from maskstream.errors import run_command
    sys.exit(run_command("maskstream preprocess", main))
