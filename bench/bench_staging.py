"""Before/after: the preprocess job's MB/s with two installs (e.g. main's venv and a branch's), and .gz reading.

    python -m maskstream.bench.bench_staging --before /work/main/.venv/bin/python --after .venv/bin/python

Runs `maskstream preprocess` on SOTU with each interpreter in turn (interleaved, --repeat times, fresh output
folder each run, medians compared: the shared machine drifts), then times reading SOTU's .gz lines with
Beam's CompressedFile (what the reader used before) against readers.Gunzip (bounded pieces, trailer checked),
in this process.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from maskstream.bench.bench_pipeline import ROOT, SOTU, TOKENIZER, read_texts


def job_seconds(python: str, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([python, "-m", "maskstream.pipeline.run", "--input", str(SOTU), "--tokenizer", str(TOKENIZER),
                    "--output", str(out), "--quiet"], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def read_seconds(bounded: bool) -> float:
    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    from maskstream.pipeline import readers
    t0 = time.perf_counter()
    if bounded:
        f = readers.Gunzip(FileSystems.open(str(SOTU), compression_type=CompressionTypes.UNCOMPRESSED))
    else:
        f = FileSystems.open(str(SOTU), compression_type=CompressionTypes.AUTO)
    with f:
        n = sum(1 for _ in readers.iter_lines(f, max_bytes=64 << 20))
    assert n > 200
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="python of the install to compare against")
    p.add_argument("--after", required=True, help="python of the install under test")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    mb = sum(len(t.encode()) for t in read_texts(str(SOTU))) / 1e6
    work = Path(tempfile.mkdtemp(prefix="maskstream-bench-staging-"))
    before, after = [], []
    for _ in range(args.repeat):
        before.append(job_seconds(args.before, work / "before"))
        after.append(job_seconds(args.after, work / "after"))
    b, a = statistics.median(before), statistics.median(after)
    print(f"[staging] SOTU {mb:.1f} MB: job before {mb / b:.2f} MB/s, after {mb / a:.2f} MB/s "
          f"(after/before {b / a:.3f}x; medians of {args.repeat}: before {[round(s, 2) for s in before]}, "
          f"after {[round(s, 2) for s in after]})")
    beam = statistics.median(read_seconds(False) for _ in range(args.repeat))
    ours = statistics.median(read_seconds(True) for _ in range(args.repeat))
    raw = SOTU.stat().st_size / 1e6
    print(f"[staging] reading SOTU's .gz lines ({raw:.1f} MB compressed): Beam CompressedFile {beam * 1e3:.0f} ms, "
          f"Gunzip {ours * 1e3:.0f} ms ({beam / ours:.2f}x)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
