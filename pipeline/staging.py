"""Datasets are replaced, never destroyed: the run's lock, its staging folder, verification and the swap.

A run builds its dataset in a staging folder and puts it in place only when the job has succeeded and the
staged dataset verifies (every listed shard present with its size and sha256, counts reconciled):
  local folder   staging is a hidden sibling `.NAME.staging-RUN` on the same filesystem; the swap is one
                 renameat2(RENAME_EXCHANGE) of the two folders (no moment without a dataset), then the files
                 in OUT that are not the dataset's own are moved into the new folder and the old one deleted.
                 Where the kernel lacks the exchange: two renames, with a window of microseconds without OUT.
  object store   (and a local folder that cannot be renamed: a mount point, a parent not writable) staging is
  (in place)     `OUT/.staging-RUN/`; the commit deletes OUT/index.json (the old dataset turns incomplete, and
                 is refused as such), moves the staged files in, deletes old shards the new index does not list,
                 and moves index.json in last (the commit point: readers trust only index.json).
A run holds a lock beside OUT (`.NAME.lock`; `OUT/.maskstream.lock` on object stores) naming its holder; a
lock of a dead process on this host is taken over with a message. A rerun removes what killed runs left.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import secrets
import socket
import sys
import time

from maskstream.errors import UserError
from maskstream.loader import format as fmt
from maskstream.loader.atomic import fsync_dir
from maskstream.pipeline import store

OWN = re.compile(r"^(index\.json|tokenizer\.json|pmi_ngrams\.json|rejects/rejects\.jsonl|shard-[0-9]{6}\.tar)"
                 r"(\.partial)?$")
_LOCK_TEMP = re.compile(r"^\.(?P<name>.+)\.lock\.(stale-)?[0-9]{8}-[0-9]{6}-(?P<pid>[0-9]+)-[0-9a-f]+(\.partial)?$")
_STAGED = re.compile(r"^\.(?P<name>.+)\.(staging|old)-[0-9A-Za-z-]+$")
INNER_STAGING = ".staging-"            # OUT/.staging-RUN/: where an in-place run writes
REMOTE_LOCK = ".maskstream.lock"       # OUT/.maskstream.lock: the lock where nothing lies beside OUT
RENAME_EXCHANGE = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """Where a run writes (staging) and how it commits (swap: exchange two local folders; else in place)."""
    output: str          # as the user gave it
    target: str          # local: the real path of OUT (symlinks resolved); else the URL
    staging: str
    swap: bool


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"


def plan(output: str, run_id: str, *, swap: bool | None = None) -> Layout:
    """The layout of one run; swap=None: a sibling swap wherever the local folder allows it."""
    if not store.is_local(output):
        return Layout(output=output, target=output, staging=store.join(output, INNER_STAGING + run_id), swap=False)
    target = os.path.realpath(store.local_path(output))
    parent, name = os.path.split(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise UserError(f"--output {output} is a file, not a folder; pass a folder (new or holding a dataset)")
    if swap is None:
        swap = os.access(parent, os.W_OK) and not (os.path.isdir(target) and os.path.ismount(target))
    inner = os.path.join(target, INNER_STAGING + run_id)
    staging = os.path.join(parent, f".{name}.staging-{run_id}") if swap else inner
    return Layout(output=output, target=target, staging=staging, swap=swap)


# ---- inputs inside the output -----------------------------------------------------------------------------

def refuse_inputs_inside(output: str, inputs: list[str]) -> None:
    """An input under OUT (or a staging folder of it) would be replaced or deleted by the run: refused first."""
    if store.is_local(output):
        target = os.path.realpath(store.local_path(output))
        parent, name = os.path.split(target)
        for path in inputs:
            if not store.is_local(path):
                continue
            real = os.path.realpath(store.local_path(path))
            first = os.path.relpath(real, parent).split(os.sep)[0]
            if real.startswith(target + os.sep) or (os.path.dirname(real) != parent and _is_ours(first, name)):
                raise UserError(f"--input {path} lies inside --output {output}, which the run replaces; move the "
                                "input out of the output folder or pass another --output")
        return
    prefix = output.rstrip("/") + "/"
    for path in inputs:
        if path.startswith(prefix):
            raise UserError(f"--input {path} lies under --output {output}, which the run replaces; move the input "
                            "or pass another --output")


def _is_ours(entry: str, name: str) -> bool:
    m = _STAGED.match(entry)
    return bool(m) and m["name"] == name


# ---- the lock ---------------------------------------------------------------------------------------------

def lock_path(output: str) -> str:
    if store.is_local(output):
        parent, name = os.path.split(os.path.realpath(store.local_path(output)))
        return os.path.join(parent, f".{name}.lock")
    return store.join(output, REMOTE_LOCK)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot, /proc/PID/stat field 22); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat.rsplit(b")", 1)[1].split()[19])  # after "pid (comm)": fields 3, 4, ... 22
    except (OSError, ValueError, IndexError):
        return None


def boot_id() -> str | None:
    """This boot's id: pids and start times are only comparable within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


class Lock:
    """Held by one run into OUT: refuses a second live run, takes over a lock of a dead process on this host."""

    def __init__(self, output: str, command: list[str], run_id: str):
        self.path = lock_path(output)
        self.output = output
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(), "run": run_id,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(command),
                       "pid_start": process_start(os.getpid()), "boot": boot_id()}

    def __enter__(self) -> "Lock":
        for _ in range(3):
            try:
                created = self._create()
            except PermissionError as e:
                raise UserError(f"--output {self.output}: cannot write the run's lock {self.path} ({e.strerror}); "
                                "pass an --output in a folder you can write") from e
            if created:
                return self
            other = self._read()
            if other is None or not self._stale(other):
                self._refuse(other)
            print(f"preprocess: taking over {self.path} of a dead run (pid {other['pid']} on {other['host']}, "
                  f"started {other['started']})",
                  file=sys.stderr, flush=True)
            self._remove_stale()
        self._refuse(self._read())

    def __exit__(self, *exc) -> None:
        if (self._read() or {}).get("run") == self.holder["run"]:
            store.delete([self.path])

    def _create(self) -> bool:
        data = json.dumps(self.holder, indent=1).encode()
        if store.is_local(self.path):
            # NOTE: the holder is written to a temp file first and then hard-linked: the lock appears whole
            # or not at all, and link() fails if it exists (one winner even for two runs at the same instant)
            temp = f"{self.path}.{self.holder['run']}"
            store.write_atomic(temp, data, temp=temp + ".partial")
            try:
                os.link(temp, self.path)
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(temp)
        # object stores: no create-if-absent here; write, then read back (strong read-after-write): last writer wins
        if store.exists(self.path):
            return False
        store.write_atomic(self.path, data, temp=f"{self.path}.{self.holder['run']}.partial")
        return (self._read() or {}).get("run") == self.holder["run"]

    def _read(self) -> dict | None:
        try:
            holder = json.loads(store.read(self.path))
        except (OSError, ValueError, FileNotFoundError):
            return None
        return holder if isinstance(holder, dict) and {"pid", "host", "started"} <= set(holder) else None

    def _stale(self, other: dict) -> bool:
        """The holder ran on this host and is gone: dead, or its pid now names another process (reused after it
        died, told by the pid's start time), or the host has rebooted since."""
        pid = other["pid"]
        if other["host"] != self.holder["host"] or not isinstance(pid, int):
            return False
        if not _alive(pid) or other.get("boot") not in (None, self.holder["boot"]):
            return True
        start = process_start(pid)
        return other.get("pid_start") is not None and start is not None and start != other["pid_start"]

    def _remove_stale(self) -> None:
        if store.is_local(self.path):   # renamed away first: of two runs taking over at once, one removes it
            aside = f"{self.path}.stale-{self.holder['run']}"
            try:
                os.rename(self.path, aside)
                os.remove(aside)
            except FileNotFoundError:
                pass
        else:
            store.delete([self.path])

    def held(self) -> bool:
        """Still ours (a remote lock could have been taken by another launcher since)."""
        return (self._read() or {}).get("run") == self.holder["run"]

    def _refuse(self, other: dict | None):
        if other is None:
            raise UserError(f"--output {self.output} is locked by {self.path}, which does not read as a lock; "
                            "if no preprocess run writes there, delete that file and rerun")
        raise UserError(f"--output {self.output} is held by a running preprocess (pid {other['pid']} on "
                        f"{other['host']}, started {other['started']}: {other.get('command', '?')[:120]}); wait "
                        f"for it to end, or if that process is not this run (dead on another host, or its pid "
                        f"reused), delete {self.path}")


# ---- leftovers of killed runs ----------------------------------------------------------------------------

def clean_leftovers(layout: Layout) -> list[str]:
    """Remove the staging folders killed runs left (their dataset files), moving back into OUT any file that
    is not a dataset's own (it came from OUT in a swap cut short); returns the folders removed."""
    removed = []
    if store.is_local(layout.output):
        parent, name = os.path.split(layout.target)
        leftovers = [os.path.join(parent, e) for e in sorted(os.listdir(parent)) if _is_ours(e, name)]
        if not os.path.exists(layout.target):      # killed between the two renames of the fallback swap
            old = [p for p in leftovers if ".old-" in os.path.basename(p)]
            if old:
                os.rename(old[-1], layout.target)
                leftovers.remove(old[-1])
        inner = [os.path.join(layout.target, e) for e in (os.listdir(layout.target) if
                 os.path.isdir(layout.target) else []) if e.startswith(INNER_STAGING)]
        for e in os.listdir(parent):      # a lock's temporary names, left by a run killed while taking it
            m = _LOCK_TEMP.match(e)
            if m and m["name"] == name and not _alive(int(m["pid"])):
                store.delete([os.path.join(parent, e)])
                removed.append(os.path.join(parent, e))
    else:
        leftovers = []
        inner = sorted({store.join(layout.target, rel.split("/")[0]) for rel in store.files(layout.target)
                        if rel.startswith(INNER_STAGING)})
    for folder in leftovers:
        for rel in store.files(folder):
            if not OWN.match(rel) and not os.path.exists(os.path.join(layout.target, rel)):
                store.move(os.path.join(folder, rel), os.path.join(layout.target, rel))
        store.remove_tree(folder)
        removed.append(folder)
    for folder in inner:
        store.remove_tree(folder)
        removed.append(folder)
    return removed


# ---- verify and commit ------------------------------------------------------------------------------------

def finalize_index(layout: Layout) -> dict | None:
    """Record the dataset's real place in the staged index.json (the job wrote the staging path) and check it.

    Returns the index, or None when the job wrote none (no document written)."""
    path = store.join(layout.staging, fmt.INDEX_FILE)
    if not store.exists(path):
        return None
    index = fmt.read_index(store.read(path), source=path)
    index["config"]["shard"]["output"] = layout.output
    store.write_atomic(path, fmt.dump_index(index), temp=path + fmt.PARTIAL_SUFFIX)
    verify(layout.staging, index)
    return index


def verify(folder: str, index: dict) -> None:
    """Refuse a staged dataset that is not whole: a listed shard missing or of another size or sha256 (local),
    a shard file not listed, counts that do not reconcile, a rejects file of another length."""
    found = store.files(folder)
    listed = {e["name"]: e for e in index["shards"]}
    problems = []
    for name, entry in listed.items():
        if found.get(name) != entry["bytes"]:
            problems.append(f"{name}: {found.get(name)} bytes, index.json says {entry['bytes']}")
        elif store.is_local(folder) and fmt.shard_sha256(os.path.join(folder, name)) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from index.json")
    problems += [f"{rel}: not listed in index.json" for rel in found
                 if rel.startswith("shard-") and rel not in listed]
    c = index["counts"]
    if c["documents_read"] != c["documents_written"] + c["documents_rejected"]:
        problems.append(f"documents read {c['documents_read']} != written {c['documents_written']} + rejected "
                        f"{c['documents_rejected']}")
    rejects = store.read(store.join(folder, index["rejects"])).count(b"\n")
    if rejects != c["documents_rejected"]:
        problems.append(f"{index['rejects']} holds {rejects} rejects, counts say {c['documents_rejected']}")
    if problems:
        raise RuntimeError(f"the staged dataset in {folder} does not verify, so it was not put in place (the "
                           f"previous one is untouched): {'; '.join(problems[:5])}")


def commit(layout: Layout, foreign: list[str]) -> None:
    """Put the verified staged dataset at OUT; foreign: files of OUT that are not the dataset's own (kept)."""
    if layout.swap:
        _swap(layout, foreign)
    else:
        _in_place(layout, foreign)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the kernel or libc lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):            # EINVAL, ENOSYS, EOPNOTSUPP: no exchange here
        return False
    raise OSError(errno, os.strerror(errno), a)


def _swap(layout: Layout, foreign: list[str]) -> None:
    target, staging = layout.target, layout.staging
    parent = os.path.dirname(target)
    if not os.path.exists(target):
        os.rename(staging, target)
    elif _exchange(staging, target):
        pass                                   # staging now holds the old folder
    else:
        old = staging.replace(".staging-", ".old-")
        os.rename(target, old)                 # NOTE: the window: until the next rename there is no OUT
        os.rename(staging, target)
        staging = old
    fsync_dir(parent)
    if os.path.isdir(staging):
        # foreign as listed before the job, and any file not named like a dataset's (one added during the run)
        for rel in sorted(set(foreign) | {rel for rel in store.files(staging) if not OWN.match(rel)}):
            if os.path.exists(os.path.join(staging, rel)) and not os.path.exists(os.path.join(target, rel)):
                store.move(os.path.join(staging, rel), os.path.join(target, rel))
        store.remove_tree(staging)


def _in_place(layout: Layout, foreign: list[str]) -> None:
    staged = store.files(layout.staging)
    index = json.loads(store.read(store.join(layout.staging, fmt.INDEX_FILE))) \
        if fmt.INDEX_FILE in staged else None
    store.delete([store.join(layout.target, fmt.INDEX_FILE)])   # the old dataset turns incomplete at once
    for rel in sorted(staged):
        if rel != fmt.INDEX_FILE:
            store.move(store.join(layout.staging, rel), store.join(layout.target, rel))
    listed = {e["name"] for e in index["shards"]} if index else set()
    stale = [rel for rel in store.files(layout.target)
             if OWN.match(rel) and rel.startswith("shard-") and rel not in listed and rel not in foreign]
    store.delete([store.join(layout.target, rel) for rel in stale])
    if index is not None:                                       # the commit point
        store.move(store.join(layout.staging, fmt.INDEX_FILE), store.join(layout.target, fmt.INDEX_FILE))
    store.remove_tree(layout.staging)
