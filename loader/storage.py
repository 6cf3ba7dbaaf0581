"""Where shards come from: byte-range reads from a local folder, an http(s) URL prefix, or gs:// / s3:// (fsspec).

Every source answers two questions: the bytes of index.json, and the bytes [offset, end) of a shard. A read
returns exactly the bytes asked for or raises; the shard's size is checked against index.json, so a shard cut
short (even exactly at a tar header boundary, which tarfile reads as a normal end) is an error, never a shorter
epoch. Shard names come from index.json and pass loader.format.check_shard_name before any path is built.

HTTP uses the standard library only (http.client): keep-alive connections per process, Range requests, a
connect/read timeout that is also the total time of one request (the body is read in chunks against that
deadline), and a bounded number of retries for dropped connections, timeouts, 5xx answers and answers of the
wrong range or length, so a stalled or trickling server fails within about (retries + 1) * timeout seconds.
4xx answers, a 200 to a Range request and a server copy of another size fail at once. A remote index.json
over IOConfig.max_index_bytes is refused from its Content-Length, or once that many bytes have come.
"""
from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

from maskstream.errors import UserError
from maskstream.loader.format import INDEX_FILE, check_shard_name


class SourceError(IOError):
    """A shard or index could not be read as index.json describes it."""


class DatasetNotFound(SourceError, UserError):
    """The path given as a dataset holds none: no such folder, or no index.json in it."""


@dataclass(frozen=True, kw_only=True)
class IOConfig:
    """Timeouts and retries of remote reads."""
    timeout_s: float = 30.0   # connect and per-read timeout, and the total time of one request
    retries: int = 3          # extra attempts after a dropped connection, a timeout, a 5xx or a wrong body
    backoff_s: float = 0.5    # wait before retry k is backoff_s * 2**k
    max_index_bytes: int = 64 * 2**20  # a remote index.json larger than this is refused, never read whole

    def __post_init__(self):
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or self.max_index_bytes < 1:
            raise ValueError(f"IOConfig(timeout_s={self.timeout_s}, retries={self.retries}, backoff_s="
                             f"{self.backoff_s}, max_index_bytes={self.max_index_bytes}): need timeout_s > 0, "
                             f"retries >= 0, backoff_s >= 0, max_index_bytes >= 1")


class LocalSource:
    """A dataset folder on a local (or mounted) file system."""

    def __init__(self, root: str, io: IOConfig):
        self.root = root
        self._files: dict[str, object] = {}  # open shard files of this process, by name
        self._pid = os.getpid()

    def __getstate__(self):  # open files do not travel to DataLoader workers
        return {"root": self.root, "_files": {}, "_pid": None}

    def read_index(self) -> bytes:
        path = os.path.join(self.root, INDEX_FILE)
        if not os.path.isdir(self.root):
            raise DatasetNotFound(f"dataset folder {self.root} does not exist; pass the --output folder of a "
                                  "`maskstream preprocess` run")
        if not os.path.exists(path):
            raise DatasetNotFound(f"{path} not found: {self.root} is not a maskstream dataset, or its job did not "
                                  "finish (index.json is written last); re-run `maskstream preprocess`")
        with open(path, "rb") as f:
            return f.read()

    def read_range(self, name: str, offset: int, end: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(name)
        if f is None:
            path = os.path.join(self.root, check_shard_name(name))
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                raise SourceError(f"shard {path} is missing; index.json lists it. Copy the whole dataset "
                                  f"folder or re-run `maskstream preprocess`") from None
            actual = os.fstat(f.fileno()).st_size
            if actual != size:
                f.close()
                raise SourceError(f"shard {path} has {actual} bytes, index.json says {size}: the shard is "
                                  f"truncated or was rewritten; re-copy it or re-run `maskstream preprocess`")
            self._files[name] = f
        f.seek(offset)
        data = f.read(end - offset)
        return _exact(data, end - offset, f"{self.root}/{name}", offset)


class HTTPSource:
    """A dataset under an http(s) URL prefix, read with Range requests."""

    def __init__(self, root: str, io: IOConfig):
        self.root = root.rstrip("/")
        self.io = io
        self._url = urllib.parse.urlsplit(self.root)
        self._conn = None
        self._pid = os.getpid()

    def __getstate__(self):
        return {**self.__dict__, "_conn": None, "_pid": None}

    def read_index(self) -> bytes:
        return self._get(INDEX_FILE, None, expect_size=None)

    def read_range(self, name: str, offset: int, end: int, size: int) -> bytes:
        return self._get(check_shard_name(name), (offset, end), expect_size=size)

    def _connection(self):
        if self._conn is None or self._pid != os.getpid():
            cls = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
            self._conn, self._pid = cls(self._url.netloc, timeout=self.io.timeout_s), os.getpid()
        return self._conn

    def _get(self, name: str, byte_range, *, expect_size) -> bytes:
        """The whole index (byte_range None) or exactly bytes [offset, end) of a shard, retried within bounds."""
        url = f"{self.root}/{name}"
        last = None
        for attempt in range(self.io.retries + 1):
            if attempt:
                time.sleep(self.io.backoff_s * 2 ** (attempt - 1))
            try:
                return self._attempt(name, url, byte_range, expect_size)
            except SourceError:  # NOTE: before OSError, its base; the body may be unread: drop the connection
                self._close()
                raise
            except _Retry as e:
                self._close()
                last = str(e)
            except (OSError, http.client.HTTPException) as e:  # timeouts, resets, dropped connections
                self._close()
                last = f"{type(e).__name__}: {e}"
        raise SourceError(f"GET {url}: failed {self.io.retries + 1} times (timeout {self.io.timeout_s}s each); "
                          f"last error: {last}")

    def _attempt(self, name: str, url: str, byte_range, expect_size) -> bytes:
        """One GET: headers checked before the body is read, the body read within timeout_s in all."""
        deadline = time.monotonic() + self.io.timeout_s
        path = f"{self._url.path.rstrip('/')}/{urllib.parse.quote(name)}"
        headers = {} if byte_range is None else {"Range": f"bytes={byte_range[0]}-{byte_range[1] - 1}"}
        conn = self._connection()
        if conn.sock is not None:  # a kept-alive socket still has the last body read's shortened timeout
            conn.sock.settimeout(self.io.timeout_s)
        conn.request("GET", path, headers=headers)
        resp = _headers_by(conn, deadline)
        if resp.status >= 500:
            raise _Retry(f"HTTP {resp.status} {resp.reason}")
        if resp.status == 404:
            what = "index.json (the dataset is incomplete or the URL is wrong)" if name == INDEX_FILE \
                else "a shard that index.json lists"
            raise SourceError(f"GET {url}: HTTP 404 Not Found: {what}")
        if byte_range is None and resp.status == 200:
            cap = self.io.max_index_bytes
            length = resp.getheader("Content-Length", "")
            if length.isdigit() and int(length) > cap:
                raise SourceError(f"GET {url}: index.json is {length} bytes, over the {cap}-byte cap "
                                  f"(IOConfig.max_index_bytes); the URL is wrong, or raise the cap")
            body = _read_body(conn, resp, cap + 1, deadline)
            if len(body) > cap:
                raise SourceError(f"GET {url}: index.json is over the {cap}-byte cap (IOConfig.max_index_bytes); "
                                  f"the URL is wrong, or raise the cap")
            return body
        if byte_range is not None and resp.status == 206:
            want = byte_range[1] - byte_range[0]
            _check_content_range(url, resp.getheader("Content-Range", ""), byte_range, expect_size)
            length = resp.getheader("Content-Length", "")
            if length.isdigit() and int(length) != want:
                raise _Retry(f"Content-Length {length} for a range of {want} bytes")
            body = _read_body(conn, resp, want + 1, deadline)
            if len(body) != want:
                raise _Retry(f"the body has {len(body)} bytes, the range {want}")
            return body
        if byte_range is not None and resp.status == 200:
            raise SourceError(f"GET {url}: the server ignored the Range header (HTTP 200); serve the "
                              f"shards from a server that supports byte ranges (any object store does)")
        raise SourceError(f"GET {url}: unexpected HTTP {resp.status} {resp.reason}")

    def _close(self):
        if self._conn is not None:
            self._conn.close()
        self._conn = None


class _Retry(Exception):
    """An answer worth asking again for: a 5xx, or a body or range other than the one asked for."""


def _headers_by(conn, deadline: float):
    """conn.getresponse(), its status line and headers read by `deadline` (monotonic), else TimeoutError.

    NOTE: http.client reads headers a line at a time, each recv with a fresh socket timeout, so a server
    trickling them is stopped by a timer that shuts the socket down at the deadline (the blocked recv returns).
    """
    sock = conn.sock
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    timer = threading.Timer(max(deadline - time.monotonic(), 0.0), _shutdown, (sock,))
    timer.start()
    try:
        resp = conn.getresponse()
    except (OSError, http.client.HTTPException) as e:
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out: the status line and headers did not all come within timeout_s") from e
        raise
    finally:
        timer.cancel()
    return resp


def _shutdown(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _read_body(conn, resp, limit: int, deadline: float) -> bytes:
    """Up to `limit` bytes of the body, in chunks, raising TimeoutError once `deadline` (monotonic) passes.

    NOTE: each socket read waits at most until the deadline, so a server trickling a byte at a time cannot
    stretch one request past timeout_s; memory stays under `limit` whatever Content-Length claims.
    """
    chunks, got = [], 0
    while got < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out: the body did not all come within timeout_s ({got} bytes read)")
        if conn.sock is not None:
            conn.sock.settimeout(left)
        chunk = resp.read1(min(1 << 20, limit - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
        if resp.length == 0:
            resp.read()  # NOTE: read1 never marks the answer done; read() does, so the connection is reused
            break
    return b"".join(chunks)


def _check_content_range(url: str, header: str, byte_range, expect_size) -> None:
    """A 206's `bytes FIRST-LAST/TOTAL` must be the range asked for, of a file of index.json's size."""
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", header.strip())
    if m is None or (int(m[1]), int(m[2]) + 1) != tuple(byte_range):
        raise _Retry(f"Content-Range {header!r} for the range bytes={byte_range[0]}-{byte_range[1] - 1}")
    if m[3] != "*" and int(m[3]) != expect_size:
        raise SourceError(f"GET {url}: the server's copy has {m[3]} bytes, index.json says "
                          f"{expect_size}: the shard is truncated or was rewritten")


class FsspecSource:
    """gs://, s3:// and other fsspec URLs, read with ranged reads (needs the protocol's fsspec extra)."""

    def __init__(self, root: str, io: IOConfig):
        self.root = root.rstrip("/")
        try:
            import fsspec
        except ImportError:
            raise SourceError(f"{root}: reading this URL needs fsspec; pip install 'maskstream[remote]' plus "
                              f"gcsfs (gs://) or s3fs (s3://)") from None
        try:
            self._fs, _ = fsspec.core.url_to_fs(self.root)
        except (ImportError, ValueError) as e:
            raise SourceError(f"{root}: fsspec cannot open this protocol ({e}); install gcsfs for gs:// or "
                              f"s3fs for s3://") from None
        self._sizes: dict[str, int] = {}
        self._max_index_bytes = io.max_index_bytes

    def read_index(self) -> bytes:
        url, cap = f"{self.root}/{INDEX_FILE}", self._max_index_bytes
        try:
            size = self._fs.size(url)
            if size is not None and size > cap:
                raise SourceError(f"{url}: index.json is {size} bytes, over the {cap}-byte cap "
                                  f"(IOConfig.max_index_bytes); the URL is wrong, or raise the cap")
            return self._fs.cat_file(url)
        except FileNotFoundError:
            raise DatasetNotFound(f"{url} not found: the dataset is incomplete or the URL is wrong") from None

    def read_range(self, name: str, offset: int, end: int, size: int) -> bytes:
        url = f"{self.root}/{check_shard_name(name)}"
        if name not in self._sizes:
            try:
                self._sizes[name] = self._fs.size(url)
            except FileNotFoundError:
                raise SourceError(f"shard {url} is missing; index.json lists it") from None
            if self._sizes[name] != size:
                raise SourceError(f"shard {url} has {self._sizes[name]} bytes, index.json says {size}: the "
                                  f"shard is truncated or was rewritten")
        return _exact(self._fs.cat_file(url, start=offset, end=end), end - offset, url, offset)


def _exact(data: bytes, want: int, where: str, offset: int) -> bytes:
    if len(data) != want:
        raise SourceError(f"{where}: read {len(data)} bytes at offset {offset}, index.json says the record has "
                          f"{want}: the shard is truncated")
    return data


def open_source(root: str, io: IOConfig | None = None):
    """The source for a dataset root: a local folder, http(s)://..., or an fsspec URL (gs://, s3://, ...)."""
    io = io or IOConfig()
    root = str(root)
    if root.startswith("pipe:") or "${" in root:
        raise SourceError(f"dataset root {root!r}: pipe: and ${{}} roots are refused; give a folder or a URL")
    scheme = urllib.parse.urlsplit(root).scheme
    if scheme in ("http", "https"):
        return HTTPSource(root, io)
    if scheme == "file":
        return LocalSource(urllib.parse.urlsplit(root).path, io)
    if len(scheme) > 1:  # one letter is a Windows drive
        return FsspecSource(root, io)
    return LocalSource(root, io)
