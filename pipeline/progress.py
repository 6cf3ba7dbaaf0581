"""Progress of a local run: workers report input bytes read to files in a folder; the launcher sums them.

Worker processes of the local multi-process runner cannot share a bar; each writes its running total to
`$MASKSTREAM_PROGRESS_DIR/<pid>` and the launching process polls the folder: a tqdm bar on a terminal, a log line
every `every_s` seconds otherwise (a job in CI or under nohup still shows it is moving). The total is the bytes
of all inputs as the readers will go through them (readers.text_size). Other runners (Dataflow) show progress
in their own UI and the variable is unset there, so workers skip reporting.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

from maskstream.loader.atomic import atomic_write

ENV = "MASKSTREAM_PROGRESS_DIR"


class Reporter:
    """Worker side: add(n) records n more bytes done (a no-op without the environment variable)."""
    def __init__(self):
        self.folder = os.environ.get(ENV)
        self.total = 0

    def add(self, n: int) -> None:
        if not self.folder:
            return
        self.total += n
        path = os.path.join(self.folder, str(os.getpid()))
        # NOTE: durable=False: a progress counter is not worth an fsync per update.
        atomic_write(path, str(self.total), temp=path + ".tmp", durable=False)


class Bar:
    """Launcher side: a context manager showing the bytes the workers report against total_bytes."""
    def __init__(self, total_bytes: int | None, *, enabled: bool = True, desc: str = "read",
                 tty: bool | None = None, every_s: float = 10.0, stream=None):
        self.total, self.enabled, self.desc, self.every_s = total_bytes, enabled, desc, every_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty

    def _done(self) -> int:
        done = 0
        for name in os.listdir(self._dir.name):
            if not name.endswith(".tmp"):
                try:
                    with open(os.path.join(self._dir.name, name)) as f:
                        done += int(f.read() or 0)
                except (OSError, ValueError):
                    pass
        return done

    def _line(self, done: int, seconds: float) -> str:
        of = f" of {self.total / 1e6:,.1f} MB ({done / max(self.total, 1):.0%})" if self.total else " MB"
        return f"preprocess: {self.desc} {done / 1e6:,.1f}{of} in {seconds:.0f} s"

    def _poll(self):
        from tqdm import tqdm
        bar = tqdm(total=self.total, unit="B", unit_scale=True, desc=self.desc, leave=False) if self.tty else None
        start = last = time.perf_counter()
        while not self._stop.wait(0.5 if self.tty else min(0.5, self.every_s)):
            done = self._done()
            if bar is not None:
                bar.update(done - bar.n)
            elif time.perf_counter() - last >= self.every_s:
                last = time.perf_counter()
                print(self._line(done, last - start), file=self.stream, flush=True)
        if bar is not None:
            bar.close()

    def __enter__(self):
        if self.enabled:
            self._dir = tempfile.TemporaryDirectory(prefix="maskstream-progress-")
            os.environ[ENV] = self._dir.name
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()
            os.environ.pop(ENV, None)
            self._dir.cleanup()
