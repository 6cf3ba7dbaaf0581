"""Streaming from a real HTTP server on 127.0.0.1 (Range requests), and every way it can fail, within bounds."""
import http.server
import threading
import time

import pytest
import torch

from maskstream.loader.storage import SourceError
from maskstream.loader.stream import LoaderConfig, MLMLoader
from helpers import collect


class ShardHandler(http.server.BaseHTTPRequestHandler):
    """Serves a folder with byte ranges; `server.mode` makes shard requests fail: drop | 404 | 503 | stall."""
    protocol_version = "HTTP/1.1"  # keep-alive, as object stores do

    def do_GET(self):
        name = self.path.removeprefix("/data/")
        mode = self.server.mode if name != "index.json" else "ok"
        self.server.requests.append((name, self.headers.get("Range")))
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


@pytest.fixture
def server(uneven):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ShardHandler)
    srv.daemon_threads = True
    srv.root, srv.mode, srv.stall_s, srv.requests = uneven, "ok", 30.0, []
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
    assert all(torch.equal(a[k], b[k]) for a, b in zip(remote, local) for k in a)
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
        assert len(remote) == 30 and all(torch.equal(a[k], b[k]) for a, b in zip(remote, local) for k in a)
        fs.pipe_file("/fsspec-test/shard-000001.tar", (uneven / "shard-000001.tar").read_bytes()[:-512])
        with pytest.raises(SourceError, match="shard-000001.tar has .* bytes, index.json says"):
            collect(MLMLoader("memory://fsspec-test", cfg))
    finally:
        fs.rm("/fsspec-test", recursive=True)
