"""atomic_write(): the one way maskstream puts a local file in place (temp beside it, fsync, rename, fsync dir)."""
from __future__ import annotations

import contextlib
import os
from typing import IO, Callable, Iterator


def fsync_dir(directory: str) -> None:
    """fsync a folder so a rename inside it survives a crash (no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(f: IO, temp: str, path: str, *, durable: bool = True) -> None:
    """Flush and fsync the open temp file f, close it, rename temp onto path and fsync the folder."""
    f.flush()
    if durable:
        os.fsync(f.fileno())
    f.close()
    os.replace(temp, path)
    if durable:
        fsync_dir(os.path.dirname(path))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, temp: str | None = None,
                durable: bool = True) -> Iterator[IO]:
    """Open a temp file in path's folder; on success flush, fsync, rename onto path and fsync the folder.

    On an exception the temp file is removed and path is left as it was.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory or ".", exist_ok=True)
    temp = temp or os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    f = open(temp, mode)
    try:
        yield f
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
    commit(f, temp, path, durable=durable)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, temp: str | None = None,
                 durable: bool = True) -> None:
    """Write bytes (or UTF-8 text) to path atomically; durable=False skips the fsyncs (progress counters)."""
    with atomic_open(path, "wb", temp=temp, durable=durable) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO], object]) -> None:
    """Call write(f) on a binary temp file, then put it in place atomically (e.g. torch.save)."""
    with atomic_open(path, "wb") as f:
        write(f)
