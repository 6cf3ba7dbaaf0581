"""Before/after: the preprocess job's MB/s with two installs (e.g. main's venv and a branch's), and .gz reading.

    python -m maskstream.bench.bench_staging --before /work/main/.venv/bin/python --after .venv/bin/python

Runs `maskstream preprocess` on SOTU with each interpreter in turn (interleaved, --repeat times, fresh output
folder each run, medians of wall and CPU time compared: the shared machine drifts), then times reading SOTU's
.gz lines with Beam's CompressedFile (what the reader used before) against readers.Gunzip (bounded pieces,
trailer checked), in this process.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from maskstream.bench.bench_pipeline import ROOT, SOTU, TOKENIZER, read_texts


def job_seconds(python: str, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one job; CPU (user + system of the job's processes) moves less than wall time
    when other work shares the cores."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([python, "-m", "maskstream.pipeline.run", "--input", str(SOTU), "--tokenizer", str(TOKENIZER),
                    "--output", str(out), "--quiet"], cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


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
    for i, what in enumerate(("wall", "CPU")):
        b, a = (statistics.median(r[i] for r in runs) for runs in (before, after))
        print(f"[staging] SOTU {mb:.1f} MB, {what} time: job before {mb / b:.2f} MB/s, after {mb / a:.2f} MB/s "
              f"(after/before {b / a:.3f}x; medians of {args.repeat}: before {[round(r[i], 2) for r in before]} s, "
              f"after {[round(r[i], 2) for r in after]} s)")
    beam = statistics.median(read_seconds(False) for _ in range(args.repeat))
    ours = statistics.median(read_seconds(True) for _ in range(args.repeat))
    raw = SOTU.stat().st_size / 1e6
    print(f"[staging] reading SOTU's .gz lines ({raw:.1f} MB compressed): Beam CompressedFile {beam * 1e3:.0f} ms, "
          f"Gunzip {ours * 1e3:.0f} ms ({beam / ours:.2f}x)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
