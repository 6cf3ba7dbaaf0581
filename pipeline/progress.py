"""Progress of a local run: workers report text bytes tokenized to files in a folder; a tqdm bar sums them.

Worker processes of the local multi-process runner cannot share a bar; each writes its running total to
`$MASKSTREAM_PROGRESS_DIR/<pid>` and the launching process polls the folder. Other runners (Dataflow) show
progress in their own UI and the variable is unset there, so workers skip reporting.
"""
from __future__ import annotations

import os
import tempfile
import threading

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
    """Launcher side: a context manager showing a tqdm bar of the bytes the workers report."""
    def __init__(self, total_bytes: int | None, *, enabled: bool = True, desc: str = "tokenized"):
        self.total, self.enabled, self.desc = total_bytes, enabled, desc

    def _poll(self):
        from tqdm import tqdm
        bar = tqdm(total=self.total, unit="B", unit_scale=True, desc=self.desc, leave=False)
        while not self._stop.wait(0.5):
            done = 0
            for name in os.listdir(self._dir.name):
                if not name.endswith(".tmp"):
                    try:
                        with open(os.path.join(self._dir.name, name)) as f:
                            done += int(f.read() or 0)
                    except (OSError, ValueError):
                        pass
            bar.update(done - bar.n)
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
