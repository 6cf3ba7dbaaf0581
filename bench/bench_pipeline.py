"""Pipeline benchmark: the Beam job end to end against raw tokenizer passes over the same text, same run.

For each corpus (the bundled SOTU corpus, SOTU x4 to show the rate once Beam's fixed start-up cost is spread,
the bundled Chinese sample repeated with distinct ids up to 40 MB (non-ASCII text at scale), and every --corpus):
text MB/s of
  - `maskstream preprocess` end to end (a fresh process: interpreter, imports, all stages, index.json),
  - one `Tokenizer.encode_batch_fast` call over all documents (Rust threads on every core)   <- the anchor,
  - the job's own tokenizing, pipeline.encoder.Encoder (same ids; ASCII documents skip the normalizer and
    BertPreTokenizer), over the same documents,
  - a `multiprocessing.Pool` of single-threaded `encode_batch` workers, one per core;
and the bytes per token of the shards written, and the peak RSS of the job's processes (summed, sampled).
On SOTU also the job with `--selection pmi` (its PMI stages: n-gram counts, the vocabulary, unit starts) against
the job without them, interleaved in the same runs.
Job, anchor and Encoder are measured --repeat times, interleaved, and their medians compared: on a shared 2-core
machine single runs of either side were seen to vary by +-20 %.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from maskstream.bench.common import Row, cpu_count

ROOT = Path(__file__).resolve().parents[1]
SOTU = ROOT / "data" / "sotu.jsonl.gz"
ZH = ROOT / "data" / "debian-reference-zh.jsonl.gz"
TOKENIZER = ROOT / "data" / "tokenizers" / "bert-base-uncased.json"
TARGETS = {"sotu x4": ">= 1.2x", "zh 40 MB": ">= 1.0x"}    # the job vs the anchor, at scale (issue 13)


def tokenizer_file(workdir: Path) -> Path:
    """The bundled BERT WordPiece tokenizer."""
    return TOKENIZER


def repeated(src: Path, dst: Path, mb: float) -> Path:
    """src's JSON-lines records repeated, each copy with its own id, until the texts hold at least mb MB."""
    with gzip.open(src, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    size = sum(len(r["text"].encode()) for r in records)
    copies = -(-int(mb * 1e6) // size)
    lines = (json.dumps({**r, "id": f"{r['id']}#{k}"}, ensure_ascii=False) for k in range(copies) for r in records)
    dst.write_bytes(gzip.compress("\n".join(lines).encode() + b"\n", compresslevel=1))
    return dst


def read_texts(path: str) -> list[str]:
    from maskstream.pipeline.config import SourceConfig
    from maskstream.pipeline.readers import clean_record, expand_inputs, iter_raw_records
    source = SourceConfig(inputs=(path,))
    texts = []
    for file, _ in expand_inputs([path]):
        for raw in iter_raw_records(file, source):
            out = clean_record(raw, source)
            if isinstance(out, list):
                texts.append("".join(d.text for d in out))
    return texts


_TOK = None


def _init(tokenizer_path):
    global _TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    _TOK = Tokenizer.from_file(tokenizer_path)


def _encode(texts) -> int:
    return sum(len(e.ids) for e in _TOK.encode_batch(texts, add_special_tokens=False))


def chunked(texts: list[str], chars: int) -> list[list[str]]:
    """Consecutive texts in lists of about `chars` characters."""
    out, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t)
        if size >= chars:
            out.append(cur)
            cur, size = [], 0
    return out + ([cur] if cur else [])


def encoder_pass(tokenizer_path: str, texts: list[str]) -> float:
    """Seconds for the job's Encoder over all texts (2 MB batches, as the job encodes them)."""
    from maskstream.pipeline.encoder import Encoder
    from maskstream.pipeline.tokenizer import load_tokenizer
    encoder = Encoder(load_tokenizer(tokenizer_path)[0])
    encoder.encode(texts[:8])
    t0 = time.perf_counter()
    for b in chunked(texts, 2 << 20):
        encoder.encode(b)
    return time.perf_counter() - t0


def raw_fast(tokenizer_path: str, texts: list[str]) -> float:
    """Seconds for one encode_batch_fast call over all texts (Rust threads)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_path)
    tok.encode_batch_fast(texts[:8], add_special_tokens=False)   # warm the thread pool
    t0 = time.perf_counter()
    tok.encode_batch_fast(texts, add_special_tokens=False)
    return time.perf_counter() - t0


def pool_pass(tokenizer_path: str, texts: list[str], workers: int) -> float:
    """Seconds for a multiprocessing.Pool tokenizing ~1 MB chunks with single-threaded encode_batch."""
    chunks = chunked(texts, 1 << 20)
    ctx = mp.get_context("spawn")   # NOTE: no fork of a process whose Rust thread pool already started
    with ctx.Pool(workers, initializer=_init, initargs=(tokenizer_path,)) as pool:
        pool.map(_encode, [chunks[0][:1]] * workers)   # workers started and tokenizer loaded: not timed
        t0 = time.perf_counter()
        pool.map(_encode, chunks, chunksize=1)
        return time.perf_counter() - t0


def tree_rss(pid: int) -> int:
    """Bytes resident in pid and all its descendants, read from /proc (a psutil tree walk reads every process
    on the machine, 1.4 ms a sample here: a tax on the job being measured)."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass               # the process ended between two reads
    return total


def sampled_peak_rss(pid: int, stop: threading.Event, out: list) -> None:
    """Largest sum of RSS over the process and its descendants, sampled every 50 ms, appended to out.

    NOTE: not ru_maxrss: a child's high-water mark starts from this (large) process's, as it is forked."""
    peak = 0
    while not stop.wait(0.05):
        peak = max(peak, tree_rss(pid))
    out.append(peak)


def job(corpus: str, tokenizer_path: str, out: Path, *flags: str) -> tuple[float, dict, float]:
    """(wall seconds, index, peak RSS MB of the job's processes) of `maskstream preprocess` in a fresh process."""
    from maskstream.loader.format import read_index
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "maskstream.pipeline.run", "--input", corpus, "--tokenizer",
                             tokenizer_path, "--output", str(out), "--quiet", "--overwrite", *flags], cwd=ROOT)
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=sampled_peak_rss, args=(proc.pid, stop, peak))
    sampler.start()
    proc.wait()
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args)
    return seconds, read_index((out / "index.json").read_bytes()), peak[0] / 2**20


def run(args) -> list[Row]:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maskstream-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tok = str(tokenizer_file(workdir))
    corpora = [("sotu", str(SOTU))]
    if not args.quick:
        x4 = workdir / "sotu-x4.jsonl.gz"
        with gzip.open(SOTU, "rb") as f:
            data = f.read()
        x4.write_bytes(gzip.compress(data * 4, compresslevel=1))
        corpora.append(("sotu x4", str(x4)))
        corpora.append(("zh 40 MB", str(repeated(ZH, workdir / "zh-40mb.jsonl.gz", 40.0))))
    corpora += [(Path(c).name, c) for c in args.corpus or []]
    rows = []
    for name, corpus in corpora:
        texts = read_texts(corpus)
        mb = sum(len(t.encode()) for t in texts) / 1e6
        out = workdir / f"shards-{name.replace(' ', '-')}"
        runs, pmi_runs = [], []   # (job s, anchor s, encoder s), interleaved so drifts hit both sides
        for _ in range(args.repeat):
            seconds, index, rss = job(corpus, tok, out)
            runs.append((seconds, raw_fast(tok, texts), encoder_pass(tok, texts)))
            if name == "sotu":
                pmi_runs.append(job(corpus, tok, out, "--selection", "pmi"))
        seconds, fast_s, enc_s = (statistics.median(r[i] for r in runs) for i in range(3))
        fast, enc = mb / fast_s, mb / enc_s
        pool = mb / pool_pass(tok, texts, cpu_count())
        shard_bytes = sum(s["bytes"] for s in index["shards"])
        bpt = shard_bytes / index["counts"]["tokens"]
        each = ", ".join(f"{fast_s_ / s_:.2f}x" for s_, fast_s_, _ in runs)
        print(f"[pipeline] {name}: {mb:.1f} MB text, {len(texts)} docs, {index['counts']['tokens']:,} tokens; "
              f"job {seconds:.2f} s = {mb / seconds:.2f} MB/s (median of {len(runs)}; each run vs its anchor: {each}); "
              f"encode_batch_fast {fast:.2f} MB/s; Encoder {enc:.2f} MB/s; Pool({cpu_count()}) {pool:.2f} MB/s; "
              f"{bpt:.3f} bytes/token; peak RSS {rss:.0f} MB", flush=True)
        rows += [
            Row(area="pipeline", name=f"job end to end, {name}", value=mb / seconds, unit="MB/s",
                anchor="encode_batch_fast", anchor_value=fast, target=TARGETS.get(name, ">= 0.8x")),
            Row(area="pipeline", name=f"job's Encoder, {name}", value=enc, unit="MB/s",
                anchor="encode_batch_fast", anchor_value=fast),
            Row(area="pipeline", name=f"Pool({cpu_count()}) encode_batch, {name}", value=pool, unit="MB/s",
                anchor="encode_batch_fast", anchor_value=fast),
            Row(area="pipeline", name=f"shard bytes/token, {name}", value=bpt, unit="bytes/token",
                anchor="flat uint16 ids", anchor_value=2.0, target="<= 2.25", higher_is_better=False),
            Row(area="pipeline", name=f"job peak RSS, {name}", value=rss, unit="MB", higher_is_better=False),
        ]
        if pmi_runs:
            rows += pmi_rows(name, mb, pmi_runs, seconds, bpt)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def pmi_rows(name: str, mb: float, pmi_runs: list, seconds: float, bpt: float) -> list[Row]:
    """The job with --selection pmi against the same job without it (medians of interleaved runs)."""
    pmi_s = statistics.median(r[0] for r in pmi_runs)
    index, rss = pmi_runs[-1][1], pmi_runs[-1][2]
    pmi_bpt = sum(s["bytes"] for s in index["shards"]) / index["counts"]["tokens"]
    print(f"[pipeline] {name} --selection pmi: job {pmi_s:.2f} s = {mb / pmi_s:.2f} MB/s against {seconds:.2f} s "
          f"without the PMI stages ({pmi_s / seconds:.2f}x the time); {index['units']['ngrams']:,} n-grams "
          f"{index['units']['ngrams_by_n']}; {pmi_bpt:.3f} bytes/token (without: {bpt:.3f}); peak RSS {rss:.0f} MB",
          flush=True)
    return [Row(area="pipeline", name=f"job with --selection pmi, {name}", value=mb / pmi_s, unit="MB/s",
                anchor="same job without PMI stages", anchor_value=mb / seconds),
            Row(area="pipeline", name=f"shard bytes/token with unit starts, {name}", value=pmi_bpt,
                unit="bytes/token", anchor="without", anchor_value=bpt, higher_is_better=False)]
