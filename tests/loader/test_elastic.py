"""Elastic resume: the global batches are a pure function of (dataset, seed, epoch, world x batch, partitions),
so a state saved on W ranks of batch B resumes on W' ranks of B' (W*B = W'*B', W' dividing the partitions)
with bitwise the same global batches and masks; ranks read only their partitions' records."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_dataset, collect, free_port

from maskstream.errors import UserError
from maskstream.loader.stream import LoaderConfig, MLMLoader


@pytest.fixture
def records(tmp_path, data_dir):
    """20 records of 29..64 sequences (uneven, so partitions start inside records): 960 sequences."""
    sizes = [64, 29, 57, 40, 63, 31, 50, 48, 45, 61, 33, 52, 44, 58, 47, 36, 60, 39, 55, 48]
    return build_dataset(tmp_path / "records", [sizes[:7], sizes[7:13], sizes[13:]])


def global_batches(root, world, batch, *, partitions=8, epoch=0, state=None, workers=0, seed=4):
    """Per step, the concatenation of every rank's batch (rank order), as CPU tensors."""
    per_rank = []
    for rank in range(world):
        loader = MLMLoader(root, LoaderConfig(batch_size=batch, partitions=partitions, seed=seed,
                                              num_workers=workers), rank=rank, world_size=world)
        loader.set_epoch(epoch)
        if state is not None:
            loader.load_state_dict(state)
        per_rank.append(collect(loader))
    return [{k: torch.cat([r[s][k] for r in per_rank]) for k in per_rank[0][s]} for s in range(len(per_rank[0]))]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


HERE = Path(__file__).resolve().parent


def gloo_run(root, out, world, batch, *, workers=0, state="", save_at=0):
    """Run elastic_worker.py on `world` real processes; rank 0's global batches from the loader's position on."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "elastic_worker.py"), str(r), str(world), str(batch),
                               str(workers), str(root), str(port), str(out), str(state), str(save_at)],
                              cwd=HERE.parents[1], env={**os.environ, "PYTHONPATH": str(HERE.parents[1])})
             for r in range(world)]
    try:
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0] * world
    return json.loads(Path(out).read_text())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gloo_2x8_to_step_k_resumes_on_4x4_and_1x16_with_every_later_global_batch_equal(records, tmp_path):
    k = 17
    uninterrupted = gloo_run(records, tmp_path / "2x8", 2, 8, save_at=k)
    assert len(uninterrupted) == 960 // 16
    state = tmp_path / "2x8.state"
    assert json.loads(state.read_text())["sequences_consumed"] == k * 8
    for world, batch, workers in ((4, 4, 0), (1, 16, 2)):
        tail = gloo_run(records, tmp_path / f"{world}x{batch}", world, batch, workers=workers, state=state)
        assert tail == uninterrupted[k:], f"resumed on {world} x {batch}"


@pytest.mark.slow
def test_every_split_of_the_global_batch_over_ranks_gives_the_same_global_batches(records):
    reference = global_batches(records, 2, 8)
    assert len(reference) == 960 // 16
    for world, batch in ((1, 16), (4, 4), (8, 2)):
        assert same(global_batches(records, world, batch), reference), f"{world} x {batch}"
    uids = [u for b in reference for u in b["uids"].tolist()]
    assert len(uids) == len(set(uids)) == 960, "every sequence once per epoch"


def test_a_state_saved_on_2x8_resumes_on_4x4_and_1x16_with_the_same_batches_and_masks(records):
    uninterrupted = global_batches(records, 2, 8, epoch=1)
    first = MLMLoader(records, LoaderConfig(batch_size=8, partitions=8, seed=4), rank=1, world_size=2)
    first.set_epoch(1)
    collect(first, limit=23)
    state = first.state_dict()
    assert state["partitions"] == 8 and state["sequences_consumed"] == 23 * 8
    for world, batch, workers in ((4, 4, 0), (1, 16, 0)):  # worker processes: the gloo test below
        tail = global_batches(records, world, batch, state=state, workers=workers)
        assert same(tail, uninterrupted[23:]), f"resumed on {world} x {batch}"


def test_the_default_partitions_are_the_world_size_and_resume_where_they_divide(records):
    state = MLMLoader(records, LoaderConfig(batch_size=8), world_size=2).state_dict()
    assert state["partitions"] == 2
    alone = MLMLoader(records, LoaderConfig(batch_size=16))
    alone.load_state_dict(state)  # 1 rank can read both partitions
    assert alone.partitions == 2
    assert same(global_batches(records, 1, 16, partitions=2), global_batches(records, 2, 8, partitions=0))
    old = {k: v for k, v in state.items() if k != "partitions"} | {"format_version": 1}
    MLMLoader(records, LoaderConfig(batch_size=16)).load_state_dict(old)  # version 1: partitions = its world
    with pytest.raises(ValueError, match="its 2 canonical partitions cannot be shared by 4 ranks"):
        MLMLoader(records, LoaderConfig(batch_size=4), world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="partitions=2 in the checkpoint but 8 here"):
        MLMLoader(records, LoaderConfig(batch_size=16, partitions=8)).load_state_dict(state)


@pytest.mark.parametrize("partitions,world,batch,message", [
    (8, 3, 8, "partitions=8 cannot be shared by world_size=3 ranks"),
    (8, 2, 6, "global batch world_size x batch_size = 2 x 6 = 12 is not a multiple of partitions=8"),
])
def test_partitions_the_world_cannot_share_are_refused(records, partitions, world, batch, message):
    with pytest.raises(UserError, match=message):
        MLMLoader(records, LoaderConfig(batch_size=batch, partitions=partitions), world_size=world)


class ByteCounter:
    """Wraps a source and counts the bytes it reads."""

    def __init__(self, inner):
        self.inner, self.bytes = inner, 0

    def read_index(self):
        return self.inner.read_index()

    def read_range(self, name, offset, end, size):
        self.bytes += end - offset
        return self.inner.read_range(name, offset, end, size)


@pytest.mark.slow
def test_each_rank_reads_little_more_than_the_bytes_of_the_sequences_it_consumes(tmp_path):
    """Bytes read per rank / bytes consumed (a record's bytes shared by its sequences), W = 1, 2, 4, 8.

    What is read beyond: the record each partition takes only part of (partitions are cut on record boundaries
    and filled up from the records after them, order.cut_partitions).
    """
    sizes = [4 + (i * 7) % 9 for i in range(96)]  # 96 records of 4..12 sequences
    records = build_dataset(tmp_path / "small-records", [sizes[:48], sizes[48:]])
    ratios = {}
    for world in (1, 2, 4, 8):
        for rank in range(world):
            loader = MLMLoader(records, LoaderConfig(batch_size=64 // world, partitions=8), rank=rank,
                               world_size=world)
            table = loader.table
            per_seq = {}
            for r in range(len(table.sequences)):
                per_seq[r] = (table.end[r] - table.offset[r]) / table.sequences[r]
            loader.source = counter = ByteCounter(loader.source)
            plan = loader._epoch_plan(0, 0)
            consumed = sum(per_seq[s.record] * (s.hi - s.lo) for spec in plan.specs(rank, 0) for s in spec.segments)
            collect(loader)
            ratios[world, rank] = counter.bytes / consumed
    print({k: round(v, 3) for k, v in ratios.items()})
    assert max(ratios.values()) <= 1.15  # cut at q * S: up to 1.14 here


def test_a_state_saved_before_version_3_resumes_with_the_contiguous_cut_it_was_saved_with(records):
    """Versions 1 and 2 cut partition q at stream positions [q*S, (q+1)*S): such a state resumes with that
    cut (the batches the run was getting), and the state it saves next keeps it."""
    loader = MLMLoader(records, LoaderConfig(batch_size=8, partitions=8, seed=4), world_size=2)
    loader.set_epoch(1)
    collect(loader, limit=5)
    state = loader.state_dict()
    assert state["format_version"] == 3 and state["layout"] == "records"
    old = {k: v for k, v in state.items() if k != "layout"} | {"format_version": 2}
    resumed = MLMLoader(records, LoaderConfig(batch_size=8, partitions=8, seed=4), world_size=2)
    resumed.load_state_dict(old)
    assert resumed.state_dict()["layout"] == "contiguous"
    plan = resumed._epoch_plan(1, 5)
    nb, g = plan.batches_per_rank, 8 * 2 // 8
    for spec in plan.specs(0, 5):  # rank 0's partitions 0..3, as the version-2 loader cut them
        assert list(spec.segments) == [s for q in range(4) for s in plan.order.segments((q * nb + spec.index) * g, g)]
    assert not same(global_batches(records, 2, 8, epoch=1, state=old), global_batches(records, 2, 8, epoch=1,
                                                                                     state=state))
