"""Streaming from a real HTTP server on 127.0.0.1 (Range requests), and every way it can fail, within bounds."""
import http.server
import threading
import time
import tracemalloc

import pytest
import torch
from helpers import collect

from maskstream.loader.storage import IOConfig, SourceError, open_source
from maskstream.loader.stream import LoaderConfig, MLMLoader


class ShardHandler(http.server.BaseHTTPRequestHandler):
    """Serves a folder with byte ranges; `server.mode` makes shard requests fail (drop | 404 | 503 | stall, or a
    MISBEHAVIOUR below) and `server.index_mode` the index.json request (huge | endless)."""
    protocol_version = "HTTP/1.1"  # keep-alive, as object stores do

    def do_GET(self):
        name = self.path.removeprefix("/data/")
        mode = self.server.mode if name != "index.json" else self.server.index_mode
        self.server.requests.append((name, self.headers.get("Range")))
        if mode in MISBEHAVIOURS:
            try:
                return MISBEHAVIOURS[mode](self, (self.server.root / name).read_bytes())
            except OSError:  # the client gave up and closed: what these tests want
                self.close_connection = True
                return
        if mode == "drop":
            self.close_connection = True
            return  # no answer at all: the client sees the connection closed
        if mode == "stall":
            time.sleep(self.server.stall_s)
            return
        if mode in ("404", "503"):
            return self.send_error(int(mode))
        path = self.server.root / name
        if not path.is_file():
            return self.send_error(404)
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng:
            first, last = (int(x) for x in rng.removeprefix("bytes=").split("-"))
            body = data[first:last + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _ranged(handler, data):
    first, last = (int(x) for x in handler.headers["Range"].removeprefix("bytes=").split("-"))
    return first, last, data[first:last + 1]


def _trickle(handler, data):
    """The right headers, then the body one byte every 0.2 s."""
    first, last, body = _ranged(handler, data)
    handler.send_response(206)
    handler.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    for i in range(len(body)):
        handler.wfile.write(body[i:i + 1])
        handler.wfile.flush()
        time.sleep(0.2)


def _trickle_headers(handler, data):
    """The status line and headers one byte every 0.2 s, without end."""
    head = b"HTTP/1.1 206 Partial Content\r\n" + b"X-Slow: " + b"a" * 10_000 + b"\r\n"
    for i in range(len(head)):
        handler.wfile.write(head[i:i + 1])
        handler.wfile.flush()
        time.sleep(0.2)


def _wrong_range(handler, data):
    """206 with the bytes 512 after the ones asked for, and a Content-Range that says so."""
    first, last, _ = _ranged(handler, data)
    body = data[first + 512:last + 513]
    handler.send_response(206)
    handler.send_header("Content-Range", f"bytes {first + 512}-{first + 511 + len(body)}/{len(data)}")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _short(handler, data):
    """206 with the right Content-Range but a body (and Content-Length) 100 bytes short."""
    first, last, body = _ranged(handler, data)
    handler.send_response(206)
    handler.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
    handler.send_header("Content-Length", str(len(body) - 100))
    handler.end_headers()
    handler.wfile.write(body[:-100])


def _cut(handler, data):
    """206 with the right headers, then half the body and the connection closed."""
    first, last, body = _ranged(handler, data)
    handler.send_response(206)
    handler.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body[:len(body) // 2])
    handler.close_connection = True


def _whole(handler, data):
    """Ignores Range: 200 with the whole file."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _flood(handler, length):
    handler.send_response(200)
    if length is None:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    else:
        handler.send_header("Content-Length", str(length))
    handler.end_headers()
    block = b" " * (1 << 16)
    for _ in range(64):  # 4 MiB, then hang: a client that waits for 10 GB never returns
        handler.wfile.write(block)
    if length is not None:
        time.sleep(30)
    while True:  # no length: the client must stop reading by itself
        handler.wfile.write(block)


MISBEHAVIOURS = {"trickle": _trickle, "trickle-headers": _trickle_headers, "wrong-range": _wrong_range,
                 "short": _short, "cut": _cut, "whole": _whole,
                 "huge": lambda h, _: _flood(h, 10 * 10**9), "endless": lambda h, _: _flood(h, None)}


@pytest.fixture
def server(uneven):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShardHandler)
    srv.daemon_threads = True
    srv.root, srv.mode, srv.index_mode, srv.stall_s, srv.requests = uneven, "ok", "ok", 30.0, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/data"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_over_http_gives_the_same_batches_as_local_files(uneven, server, workers):
    cfg = LoaderConfig(batch_size=16, num_workers=workers, seed=5)
    remote, local = collect(MLMLoader(server.url, cfg)), collect(MLMLoader(uneven, cfg))
    assert len(remote) == len(local) == 30
    assert all(torch.equal(a[k], b[k]) for a, b in zip(remote, local, strict=False) for k in a)
    assert all(r and r.startswith("bytes=") for name, r in server.requests if name != "index.json")


def test_http_resume_reads_only_the_remaining_records(uneven, server):
    loader = MLMLoader(server.url, LoaderConfig(batch_size=16))
    loader.load_state_dict({**loader.state_dict(), "sequences_consumed": 16 * 25})
    server.requests.clear()
    assert len(collect(loader)) == 5
    assert 0 < len(server.requests) <= 4, "5 batches of 16 span at most 4 records"


@pytest.mark.parametrize("mode,message", [
    ("drop", "failed 2 times .*RemoteDisconnected"),
    ("503", "failed 2 times .*HTTP 503"),
    ("404", "HTTP 404 Not Found: a shard that index.json lists"),
    ("stall", "failed 2 times \\(timeout 0.5s each\\).*timed out"),
])
def test_a_failing_server_fails_within_a_bounded_time_with_a_clear_error(server, mode, message):
    loader = MLMLoader(server.url, LoaderConfig(batch_size=16, timeout_s=0.5, retries=1))
    server.mode = mode
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=message):
        collect(loader)
    assert time.monotonic() - t0 < 5.0


@pytest.mark.parametrize("mode,message", [
    ("trickle", "failed 2 times \\(timeout 1.0s each\\).*TimeoutError"),
    ("trickle-headers", "failed 2 times \\(timeout 1.0s each\\).*TimeoutError"),
    ("wrong-range", "failed 2 times .*Content-Range 'bytes \\d+-\\d+/\\d+' for the range bytes="),
    ("short", "failed 2 times .*Content-Length \\d+ for a range of \\d+ bytes"),
    ("cut", "failed 2 times .*the body has \\d+ bytes, the range \\d+"),
    ("whole", "the server ignored the Range header \\(HTTP 200\\)"),
])
def test_a_misbehaving_server_fails_within_retries_times_timeout_naming_the_url(server, mode, message):
    loader = MLMLoader(server.url, LoaderConfig(batch_size=16, timeout_s=1.0, retries=1))
    server.mode = mode
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=f"GET {server.url}/shard-\\d+\\.tar: .*{message}"):
        collect(loader)
    elapsed = time.monotonic() - t0
    print(f"{mode}: failed after {elapsed:.2f}s")
    assert elapsed < 4.0, "(retries + 1) * timeout_s + backoff is 2.5 s"
    shard_requests = [r for name, r in server.requests if name != "index.json"]
    assert len(shard_requests) == (1 if mode == "whole" else 2), "retried once, except a server that ignores Range"


@pytest.mark.parametrize("mode", ["huge", "endless"])
def test_an_oversized_index_is_refused_quickly_in_bounded_memory(server, mode):
    """Content-Length 10 GB is refused from the headers; a body with no length is read only up to the cap."""
    server.index_mode = mode
    io = IOConfig(timeout_s=5.0, retries=0, max_index_bytes=2 * 2**20)
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(SourceError, match=f"GET {server.url}/index.json: index.json is .*over the "
                                              f"{2 * 2**20}-byte cap"):
            open_source(server.url, io).read_index()
        elapsed, peak = time.monotonic() - t0, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"{mode}: refused after {elapsed:.2f}s, peak {peak / 2**20:.1f} MiB")
    assert elapsed < 2.0 and peak < 8 * 2**20


def test_the_default_index_cap_refuses_a_10_gb_index_through_the_loader(server):
    server.index_mode = "huge"
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="index.json is 10000000000 bytes, over the 67108864-byte cap"):
        MLMLoader(server.url, LoaderConfig(timeout_s=5.0, retries=0))
    assert time.monotonic() - t0 < 2.0


def test_a_missing_index_over_http_is_refused(server):
    with pytest.raises(SourceError, match="404.*index.json"):
        MLMLoader(server.url + "/nothing-here", LoaderConfig(timeout_s=2, retries=0))


def test_a_server_copy_of_another_size_is_refused(uneven, server):
    path = uneven / "shard-000002.tar"
    path.write_bytes(path.read_bytes()[:-1024])  # the end-of-archive blocks: records themselves still read fine
    with pytest.raises(SourceError, match="server's copy has .* bytes, index.json says"):
        collect(MLMLoader(server.url, LoaderConfig(batch_size=16)))


def test_fsspec_urls_read_by_byte_range_give_the_same_batches(uneven):
    """gs:// and s3:// go through fsspec; its in-memory file system stands in for them here."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for path in uneven.iterdir():
        fs.pipe_file(f"/fsspec-test/{path.name}", path.read_bytes())
    try:
        cfg = LoaderConfig(batch_size=16, seed=5)
        remote, local = collect(MLMLoader("memory://fsspec-test", cfg)), collect(MLMLoader(uneven, cfg))
        assert len(remote) == 30
        assert all(torch.equal(a[k], b[k]) for a, b in zip(remote, local, strict=False) for k in a)
        fs.pipe_file("/fsspec-test/shard-000001.tar", (uneven / "shard-000001.tar").read_bytes()[:-512])
        with pytest.raises(SourceError, match="shard-000001.tar has .* bytes, index.json says"):
            collect(MLMLoader("memory://fsspec-test", cfg))
    finally:
        fs.rm("/fsspec-test", recursive=True)


def test_an_oversized_index_over_fsspec_is_refused_from_its_size(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/fsspec-big/index.json", b" " * (2 * 2**20 + 1))
    try:
        with pytest.raises(SourceError, match="memory://fsspec-big/index.json: index.json is 2097153 bytes, "
                                              "over the 2097152-byte cap"):
            open_source("memory://fsspec-big", IOConfig(max_index_bytes=2 * 2**20)).read_index()
    finally:
        fs.rm("/fsspec-big", recursive=True)
