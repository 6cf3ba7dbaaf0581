"""The local cache of a remote dataset (a real HTTP server on 127.0.0.1): fetched once, shared by later epochs,
workers and loaders, evicted least-recently-used within its limit, never used for another dataset."""
import os

import pytest
import test_http
import torch
from helpers import build_dataset, collect

from maskstream.errors import UserError
from maskstream.loader import format as fmt
from maskstream.loader.stream import LoaderConfig, MLMLoader

server = test_http.server  # the fixture: a real ThreadingHTTPServer on 127.0.0.1 serving `uneven`


def shard_requests(server):
    return [r for r in server.requests if r[0] != "index.json"]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def cache_bytes(folder):
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_a_second_epoch_over_http_makes_no_shard_requests(uneven, server, tmp_path):
    cfg = LoaderConfig(batch_size=16, seed=5, cache_dir=str(tmp_path / "cache"))
    loader = MLMLoader(server.url, cfg)
    first = collect(loader)
    fetched = len(shard_requests(server))
    assert fetched > 0
    server.requests.clear()
    second = collect(loader)
    assert shard_requests(server) == [], "epoch 2 reads every record from the cache"
    local = MLMLoader(uneven, LoaderConfig(batch_size=16, seed=5))
    assert same(first, collect(local)) and same(second, collect(local))


@pytest.mark.slow
def test_worker_processes_and_other_loaders_share_the_cache(server, tmp_path):
    collect(MLMLoader(server.url, LoaderConfig(batch_size=16, seed=5, cache_dir=str(tmp_path / "cache"))))
    server.requests.clear()
    again = MLMLoader(server.url, LoaderConfig(batch_size=16, seed=5, num_workers=2, cache_dir=str(tmp_path / "cache")))
    again.set_epoch(1)
    assert len(collect(again)) == 30 and shard_requests(server) == []


def test_an_evicting_cache_stays_within_its_limit_and_gives_the_same_batches(uneven, server, tmp_path):
    limit = 72_000  # two fifths of the dataset, a little over what one batch needs
    cfg = LoaderConfig(batch_size=16, seed=5, cache_dir=str(tmp_path / "cache"), cache_limit_bytes=limit)
    loader = MLMLoader(server.url, cfg)
    batches = collect(loader) + collect(loader)
    local = MLMLoader(uneven, LoaderConfig(batch_size=16, seed=5))
    assert same(batches, collect(local) + collect(local))
    assert sum(e["bytes"] for e in loader.index["shards"]) > 2 * limit
    assert cache_bytes(tmp_path / "cache") <= limit
    assert len(shard_requests(server)) > len({r for r in shard_requests(server)}), "evicted records fetched again"


def test_a_limit_below_what_one_batch_needs_is_refused_in_one_line(server, tmp_path):
    loader = MLMLoader(server.url, LoaderConfig(batch_size=16))
    largest = int((loader.table.end - loader.table.offset).max())
    cfg = LoaderConfig(batch_size=16, cache_dir=str(tmp_path / "cache"), cache_limit_bytes=largest + 8)
    with pytest.raises(UserError, match="cache_limit_bytes=.* is below what one batch needs: batch \\d+ of rank 0 "
                                        "reads .* bytes of records; raise cache_limit_bytes to at least"):
        collect(MLMLoader(server.url, cfg))
    with pytest.raises(UserError, match="is below one record of"):
        MLMLoader(server.url, LoaderConfig(cache_dir=str(tmp_path / "cache"), cache_limit_bytes=1000))


def test_a_cache_of_another_dataset_is_never_used(uneven, server, tmp_path):
    cfg = LoaderConfig(batch_size=16, seed=5, cache_dir=str(tmp_path / "cache"))
    collect(MLMLoader(server.url, cfg))
    other = build_dataset(tmp_path / "other", [[64, 64, 40, 3], [17], [64, 64, 64, 64, 43]], seed=3)
    for name in os.listdir(other):  # the same shard names and record offsets, other sequences
        (uneven / name).write_bytes((other / name).read_bytes())
    server.requests.clear()
    from_server = collect(MLMLoader(server.url, cfg))
    assert same(from_server, collect(MLMLoader(other, LoaderConfig(batch_size=16, seed=5))))
    assert shard_requests(server), "fetched, not taken from the first dataset's cache"
    assert len(os.listdir(tmp_path / "cache")) == 2, "one folder per dataset fingerprint"


def test_a_damaged_cache_file_is_fetched_again(uneven, server, tmp_path):
    cfg = LoaderConfig(batch_size=16, seed=5, cache_dir=str(tmp_path / "cache"))
    first = collect(MLMLoader(server.url, cfg))
    victim = sorted((tmp_path / "cache").rglob("shard-*"))[0]
    victim.write_bytes(victim.read_bytes()[:-9] + b"x" * 9)
    server.requests.clear()
    assert same(collect(MLMLoader(server.url, cfg)), first)
    assert len(shard_requests(server)) == 1, "only the damaged record is fetched again"


def test_a_record_that_fails_its_index_checksum_is_never_cached(uneven, server, tmp_path):
    cfg = LoaderConfig(batch_size=16, seed=5, cache_dir=str(tmp_path / "cache"))
    loader = MLMLoader(server.url, cfg)
    assert "checksums" in loader.index["shards"][0], "format v2: a checksum per record"
    path = uneven / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # the server's copy changed after index.json was written
    path.write_bytes(bytes(data))
    with pytest.raises(fmt.FormatError, match="xxh3_64 .* but index.json says"):
        collect(loader)
    assert not list((tmp_path / "cache").rglob("shard-000000.tar.0-*")), "the bad record was not kept"
