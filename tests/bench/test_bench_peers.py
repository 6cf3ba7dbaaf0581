"""`make bench-peers` harness: the export the peers read is exactly our shards' sequences, the HTTP server our
loader reads in the benchmark serves the same batches, and (with .venv-peers) the peers' copies read back equal.
No timing is asserted anywhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import build_dataset, collect, sotu_sequences

from maskstream.bench import bench_peers
from maskstream.loader.stream import LoaderConfig, MLMLoader

RECORDS = [[64, 64, 30], [17]]  # uneven records and shards
N = sum(sum(s) for s in RECORDS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("ds"), RECORDS)


def test_export_holds_every_sequence_in_record_order(dataset, tmp_path):
    tokens = bench_peers.export_tokens(str(dataset), tmp_path / "tokens.npy")
    written = sotu_sequences(N)[0]  # what build_dataset wrote, in shard and record order
    saved = np.load(tmp_path / "tokens.npy")
    assert saved.dtype == np.uint16 and saved.shape == (N, written.shape[1])
    assert np.array_equal(saved, written) and np.array_equal(tokens, saved)


def test_export_holds_the_sequences_the_loader_yields(dataset, tmp_path):
    exported = {row.tobytes() for row in bench_peers.export_tokens(str(dataset), tmp_path / "t.npy")
                .astype(np.int64)}
    batches = collect(MLMLoader(str(dataset), LoaderConfig(batch_size=5, num_workers=0)))
    seen = set()
    for b in batches:  # the unmasked sequence: the label where masked, the input elsewhere
        original = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])
        seen |= {row.tobytes() for row in original.numpy()}
    assert len(seen) == N // 5 * 5 and seen <= exported


def test_range_server_gives_the_local_batches_and_counts_shard_requests(dataset):
    config = LoaderConfig(batch_size=25, num_workers=0)
    local = collect(MLMLoader(str(dataset), config))
    with bench_peers.RangeServer(dataset) as server:
        remote = collect(MLMLoader(server.url, config))
        requests = server.shard_requests()
    assert len(remote) == len(local) == N // 25
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert requests >= sum(len(s) for s in RECORDS)  # every record was fetched over HTTP at least once


def test_missing_peers_venv_is_one_clear_error(tmp_path):
    with pytest.raises(bench_peers.UserError, match="make bench-peers"):
        bench_peers.peers_python(str(tmp_path / "nope" / "python"))


needs_peers = pytest.mark.skipif(not (bench_peers.PEERS_VENV / ".installed").exists(),
                                 reason=".venv-peers is absent or unfinished (`make bench-peers` builds it); the "
                                        "peer loaders only install there")


@pytest.mark.slow
@needs_peers
def test_peers_read_back_the_export_and_mask_it(dataset, tmp_path):
    bench_peers.export_tokens(str(dataset), tmp_path / "tokens.npy")
    python = bench_peers.PEERS_PYTHON
    # convert reads both copies back unshuffled and exits non-zero unless each equals tokens.npy, in order
    conv = bench_peers.run_worker(python, ["convert", "--tokens", str(tmp_path / "tokens.npy"), "--out",
                                           str(tmp_path / "peers")], tmp_path / "convert.json")
    assert conv["checked"] and conv["sequences"] == N
    for peer in bench_peers.PEERS:
        with bench_peers.PeerProcess(python, peer, tmp_path / "peers", 0.15, batch=16) as process:
            process.ready()
            for workers, masked in ((0, True), (2, True), (0, False)):
                out = process.time(workers=workers, masked=masked, warmup=1, batches=2)
                assert out["tokens"] == 2 * 16 * 128
                if masked:  # HF's collator masked ~15 % of the non-special tokens
                    assert 0.05 < out["masked_frac"] < 0.25
                else:
                    assert out["masked_frac"] == 0
