"""File operations on the job's output: a local folder, a Beam filesystem (gs://, s3://) or another fsspec URL.

The one place the writer, the staging commit and the launcher touch output files. Local paths use os; a URL
whose scheme Beam's FileSystems knows goes through it (what workers on Dataflow have); any other scheme
through fsspec (`memory://` in tests). Object stores have no rename: `move` is copy + delete there.
"""
from __future__ import annotations

import functools
import os
import shutil

from maskstream.loader.atomic import atomic_write


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> str:
    return path.removeprefix("file://")


def join(base: str, *names: str) -> str:
    if is_local(base):
        return os.path.join(local_path(base), *names)
    return "/".join([base.rstrip("/"), *names])


@functools.lru_cache(maxsize=None)
def _beam_knows(scheme: str) -> bool:
    from apache_beam.io.filesystems import FileSystems
    try:
        FileSystems.get_filesystem(f"{scheme}://x")
    except ValueError:
        return False
    return True


def _fsspec(path: str):
    """(fsspec filesystem, path without protocol) for a URL Beam does not know."""
    import fsspec
    return fsspec.core.url_to_fs(path)


def _beam(path: str) -> bool:
    return _beam_knows(path.split("://", 1)[0])


def create(path: str):
    """A binary stream writing path (created or replaced; local folders are made)."""
    if is_local(path):
        os.makedirs(os.path.dirname(local_path(path)) or ".", exist_ok=True)
        return open(local_path(path), "wb")
    if _beam(path):
        from apache_beam.io.filesystems import FileSystems
        return FileSystems.create(path)
    fs, p = _fsspec(path)
    return fs.open(p, "wb")


def read(path: str) -> bytes:
    if is_local(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    if _beam(path):
        from apache_beam.io.filesystems import CompressionTypes, FileSystems
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f.read()
    fs, p = _fsspec(path)
    return fs.cat_file(p)


def exists(path: str) -> bool:
    if is_local(path):
        return os.path.exists(local_path(path))
    if _beam(path):
        from apache_beam.io.filesystems import FileSystems
        return FileSystems.exists(path)
    fs, p = _fsspec(path)
    return fs.exists(p)


def write_atomic(path: str, data: bytes, temp: str) -> None:
    """Write bytes under temp, then move onto path (local: fsync and rename)."""
    if is_local(path):
        atomic_write(local_path(path), data, temp=local_path(temp))
        return
    with create(temp) as f:
        f.write(data)
    move(temp, path)


def files(root: str) -> dict[str, int]:
    """Every file under root (recursively) by relative path with / separators -> its size; {} if root is absent."""
    if is_local(root):
        root = local_path(root)
        found = {}
        for folder, _, names in os.walk(root):
            rel = os.path.relpath(folder, root)
            for name in names:
                key = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
                found[key] = os.path.getsize(os.path.join(folder, name))
        return found
    prefix = root.rstrip("/") + "/"
    if _beam(root):
        from apache_beam.io.filesystems import FileSystems
        listed = FileSystems.match([prefix + "**"])[0].metadata_list
        return {m.path[len(prefix):]: m.size_in_bytes for m in listed}
    fs, p = _fsspec(root)
    if not fs.exists(p):
        return {}
    base = p.rstrip("/") + "/"
    return {k[len(base):]: info["size"] for k, info in fs.find(p, detail=True).items() if k.startswith(base)}


def move(src: str, dst: str) -> None:
    """Put src at dst, replacing it (an atomic rename on one local filesystem; copy + delete on object stores)."""
    if is_local(src):
        os.makedirs(os.path.dirname(local_path(dst)) or ".", exist_ok=True)
        os.replace(local_path(src), local_path(dst))
        return
    if _beam(src):
        from apache_beam.io.filesystems import FileSystems
        if FileSystems.exists(dst):
            FileSystems.delete([dst])
        FileSystems.rename([src], [dst])
        return
    fs, p = _fsspec(src)
    fs.mv(p, _fsspec(dst)[1])


def delete(paths: list[str]) -> None:
    """Delete these files (those already gone are ignored)."""
    for path in paths:
        if is_local(path):
            try:
                os.remove(local_path(path))
            except FileNotFoundError:
                pass
        elif exists(path):
            if _beam(path):
                from apache_beam.io.filesystems import FileSystems
                FileSystems.delete([path])
            else:
                fs, p = _fsspec(path)
                fs.rm_file(p)


def remove_tree(root: str) -> None:
    """Delete a folder (prefix) of ours and everything under it."""
    if is_local(root):
        shutil.rmtree(local_path(root), ignore_errors=True)
    else:
        delete([join(root, rel) for rel in files(root)])
