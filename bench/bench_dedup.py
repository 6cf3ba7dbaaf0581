"""MinHash dedup against HF datatrove, in one run: throughput (MB/s), peak RSS, and both tools' recall and
precision on planted copies; plus what --dedup minhash adds to the whole job.

Corpus (built here from SOTU, deterministic; 8 MB for the comparison, 40 MB for the job's cost): documents of
30 sentences drawn at random from all SOTU sentences (distinct: two rarely share more than a sentence), then
planted copies of 3% of them verbatim but for case and spacing (exact) and of another 3% with 2% of their
words replaced (near).
The plants come after their originals, so a right drop removes the plant and keeps the original.

Ours: ReadDocuments -> Clean -> Dedup (pipeline/curation.py) on the local runner, in a fresh process.
datatrove: MinhashDedupSignature -> Buckets -> Cluster -> Filter on LocalPipelineExecutor (1 worker), with
the same shingles (word 5-grams) and bands (14 x 8), in the peers bench env (.venv-peers, `make bench-peers`):
bench/dedup_datatrove.py. Both read the same JSONL; each side's peak RSS is sampled over its process tree.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from maskstream.bench.bench_pipeline import SOTU, TOKENIZER, job, sampled_peak_rss
from maskstream.bench.common import Row

ROOT = Path(__file__).resolve().parents[1]
# the peers bench env's interpreter; MASKSTREAM_PEERS_PYTHON points elsewhere (a development venv)
PEERS_PYTHON = Path(os.environ.get("MASKSTREAM_PEERS_PYTHON", ROOT / ".venv-peers" / "bin" / "python"))
SENTENCES_PER_DOC, PLANT_FRACTION, NEAR_CHANGE = 30, 0.03, 0.02


def build_corpus(path: Path, megabytes: float) -> dict[int, int]:
    """Write the corpus as JSONL with an "id"; returns the planted ids -> their original's id."""
    with gzip.open(SOTU, "rt") as f:
        sentences = [s.strip() + "." for line in f for s in json.loads(line)["text"].split(". ") if s.strip()]
    rng = np.random.default_rng(20261202)
    docs = []
    while sum(map(len, docs)) < megabytes * 1e6 / (1 + 2 * PLANT_FRACTION):
        docs.append(" ".join(sentences[i] for i in rng.integers(0, len(sentences), SENTENCES_PER_DOC)))
    chosen = rng.choice(len(docs), int(2 * PLANT_FRACTION * len(docs)), replace=False)
    plants = {}
    for k, i in enumerate(chosen):
        if k % 2:
            words = docs[i].split()
            for j in rng.choice(len(words), max(1, int(NEAR_CHANGE * len(words))), replace=False):
                words[j] = f"changed{j}"
            copy = " ".join(words)
        else:
            copy = "  " + docs[i].upper().replace(" ", "  ")
        plants[len(docs)] = int(i)
        docs.append(copy)
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(docs))
    return plants


def scores(dropped: set[int], plants: dict[int, int]) -> tuple[float, float]:
    """(recall on the plants, precision of the drops)."""
    right = len(dropped & set(plants))
    return right / max(len(plants), 1), right / max(len(dropped), 1)


def measured(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB of the process tree, stdout) of a command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=sampled_peak_rss, args=(proc.pid, stop, peak))
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return seconds, peak[0] / 2**20, out


def ours(corpus: str) -> None:
    """(In a fresh process) Read -> Clean -> Dedup on the local runner; prints the dropped ids as JSON."""

    import apache_beam as beam

    from maskstream.pipeline import run as pipeline_run
    from maskstream.pipeline.config import SourceConfig
    from maskstream.pipeline.curation import Dedup
    from maskstream.pipeline.dedup import DedupConfig
    from maskstream.pipeline.local_runner import hidden_packages
    from maskstream.pipeline.transforms import REJECT, Clean, Data, ReadDocuments
    source = SourceConfig(inputs=(corpus,))
    options, runner = pipeline_run.pipeline_options(["--direct_running_mode=in_memory"])
    with hidden_packages(pipeline_run.CLOUD_CLIENTS), beam.Pipeline(runner=runner, options=options) as p:
        docs = (p | "ReadDocuments" >> ReadDocuments([corpus], source) | "Records" >> Data()
                | "Clean" >> Clean(source) | "Docs" >> Data())
        (docs | "Dedup" >> Dedup(DedupConfig(mode="minhash"))
         | "Rejects" >> beam.FlatMap(lambda e: [e[1].position] if e[0] == REJECT else [])
         | "Collect" >> beam.combiners.ToList()
         | "Print" >> beam.Map(lambda ids: print(json.dumps(sorted(ids)))))   # in_memory: this process's stdout


def run(args) -> list[Row]:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maskstream-bench-dedup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "planted.jsonl"
    plants = build_corpus(corpus, 2 if args.quick else 8)
    mb = corpus.stat().st_size / 1e6
    print(f"[dedup] corpus {mb:.1f} MB, {len(plants)} planted copies", flush=True)
    s, rss, out = measured([sys.executable, "-m", "maskstream.bench.bench_dedup", "--ours", str(corpus)])
    recall, precision = scores(set(json.loads(out)), plants)
    print(f"[dedup] maskstream: {s:.1f} s = {mb / s:.2f} MB/s, peak RSS {rss:.0f} MB, recall {recall:.3f}, "
          f"precision {precision:.3f}", flush=True)
    rows = [Row(area="dedup", name=f"MinHash dedup, {mb:.0f} MB planted (datatrove not run)", value=mb / s,
                unit="MB/s"),
            Row(area="dedup", name="recall / precision on planted copies", value=recall, unit="",
                anchor="precision", anchor_value=precision)]
    try:
        ds, drss, dout = measured([str(PEERS_PYTHON), str(ROOT / "bench" / "dedup_datatrove.py"), str(corpus),
                                   str(workdir / "datatrove")]) if PEERS_PYTHON.exists() else (0, 0, "")
    except subprocess.CalledProcessError as e:     # e.g. a package it needs is missing: say so, keep the rest
        print(f"[dedup] datatrove failed ({e}); see its error above", flush=True)
        dout = ""
    if dout:
        drecall, dprecision = scores(set(json.loads(dout)), plants)
        print(f"[dedup] datatrove: {ds:.1f} s = {mb / ds:.2f} MB/s, peak RSS {drss:.0f} MB, recall {drecall:.3f}, "
              f"precision {dprecision:.3f}", flush=True)
        rows = [
            Row(area="dedup", name=f"MinHash dedup, {mb:.0f} MB planted", value=mb / s, unit="MB/s",
                anchor="datatrove 0.9 MinHash", anchor_value=mb / ds, target=">= 2x"),
            Row(area="dedup", name="MinHash dedup peak RSS", value=rss, unit="MB", anchor="datatrove",
                anchor_value=drss, higher_is_better=False),
            Row(area="dedup", name="recall on planted copies", value=recall, unit="", anchor="datatrove",
                anchor_value=drecall, target=">= 1x"),
            Row(area="dedup", name="precision of drops", value=precision, unit="", anchor="datatrove",
                anchor_value=dprecision),
        ]
    elif not PEERS_PYTHON.exists():
        print(f"[dedup] datatrove: skipped, {PEERS_PYTHON} missing (make bench-peers builds it)", flush=True)
    # the job's cost of --dedup minhash: a larger corpus with and without it
    corpus = workdir / "planted-large.jsonl"
    build_corpus(corpus, 4 if args.quick else 40)
    mb = corpus.stat().st_size / 1e6
    plain, _, plain_rss = job(str(corpus), str(TOKENIZER), workdir / "plain")
    deduped, _, dedup_rss = job(str(corpus), str(TOKENIZER), workdir / "deduped", "--dedup", "minhash")
    print(f"[dedup] job on {mb:.1f} MB: {plain:.1f} s without, {deduped:.1f} s with --dedup minhash; "
          f"peak RSS {plain_rss:.0f} / {dedup_rss:.0f} MB", flush=True)
    rows.append(Row(area="dedup", name=f"job with --dedup minhash, {mb:.0f} MB", value=mb / deduped, unit="MB/s",
                    anchor="job without", anchor_value=mb / plain))
    rows.append(Row(area="dedup", name="job peak RSS with --dedup minhash", value=dedup_rss, unit="MB",
                    anchor="job without", anchor_value=plain_rss, higher_is_better=False))
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["--ours"]:
        ours(sys.argv[2])
