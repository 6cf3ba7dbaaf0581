"""Exact resume: state_dict after k batches, a new loader (any worker count) gives exactly the rest of the
epoch, reading nothing before the record that holds the next sequence."""
import pytest
import torch
from helpers import build_dataset, collect

from maskstream.loader.order import RecordTable, plan_epoch
from maskstream.loader.stream import LoaderConfig, MLMLoader


def same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b, strict=False))


@pytest.mark.parametrize("workers,resume_workers", [(0, 0), pytest.param(2, 2, marks=pytest.mark.slow), (2, 1), (0, 2)])
def test_resume_after_0_1_and_many_batches_gives_the_uninterrupted_batches(uneven, workers, resume_workers):
    cfg = LoaderConfig(batch_size=16, seed=11, num_workers=workers)
    full = MLMLoader(uneven, cfg)
    full.set_epoch(1)
    uninterrupted = collect(full)
    assert len(uninterrupted) == full.batches_per_epoch == 30
    for k in (0, 1, 13):
        first = MLMLoader(uneven, cfg)
        first.set_epoch(1)
        head = collect(first, limit=k) if k else []
        state = first.state_dict()
        assert state["epoch"] == 1 and state["sequences_consumed"] == 16 * k
        resumed = MLMLoader(uneven, LoaderConfig(batch_size=16, seed=11, num_workers=resume_workers))
        resumed.load_state_dict(state)
        tail = collect(resumed)
        assert same(head + tail, uninterrupted), f"resume after {k} batches"
        uids = [u for b in head + tail for u in b["uids"].tolist()]
        assert len(uids) == len(set(uids)) == 30 * 16, "no gap, no duplicate"
        assert resumed.epoch == 2 and resumed.state_dict()["sequences_consumed"] == 0


class RecordingSource:
    """Wraps a source and records every byte range read."""

    def __init__(self, inner):
        self.inner, self.reads = inner, []

    def read_index(self):
        return self.inner.read_index()

    def read_range(self, name, offset, end, size):
        self.reads.append((name, offset))
        return self.inner.read_range(name, offset, end, size)


def test_resume_seeks_straight_to_the_record_of_the_next_sequence(uneven):
    cfg = LoaderConfig(batch_size=16, seed=2)
    loader = MLMLoader(uneven, cfg)
    loader.load_state_dict({**loader.state_dict(), "sequences_consumed": 16 * 17})
    loader.source = RecordingSource(loader.source)
    collect(loader)
    table = RecordTable.from_index(loader.index)
    plan = plan_epoch(table, seed=2, epoch=0, batch_size=16, world_size=1, remainder="drop")
    expected = []
    for b in range(17, 30):
        for seg in plan.batch(0, b).segments:
            key = (loader.index["shards"][table.shard[seg.record]]["name"], int(table.offset[seg.record]))
            if key not in expected:
                expected.append(key)
    assert loader.source.reads == expected, "reads exactly the records of the remaining batches, each once"
    assert len(expected) < len(table.sequences)


def test_state_rolls_over_to_the_next_epoch_after_the_last_batch(uneven):
    loader = MLMLoader(uneven, LoaderConfig(batch_size=64, remainder="wrap"))
    batches = collect(loader)
    assert len(batches) == loader.batches_per_epoch == 8
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["sequences_consumed"] == 0
    assert loader.stats[0] == {"sequences": 487, "batches_per_rank": 8, "dropped": 0, "wrapped": 25}


def test_a_state_that_does_not_fit_is_refused(uneven, tmp_path):
    state = MLMLoader(uneven, LoaderConfig(batch_size=16)).state_dict()
    with pytest.raises(ValueError, match="global batch is world_size x batch_size = 1 x 16 = 16 in the "
                                         "checkpoint but 1 x 8 = 8 here"):
        MLMLoader(uneven, LoaderConfig(batch_size=8)).load_state_dict(state)
    with pytest.raises(ValueError, match="1 x 16 = 16 in the checkpoint but 2 x 16 = 32 here"):
        MLMLoader(uneven, LoaderConfig(batch_size=16), rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="its 1 canonical partitions cannot be shared by 2 ranks"):
        MLMLoader(uneven, LoaderConfig(batch_size=8), rank=1, world_size=2).load_state_dict(state)
    other = build_dataset(tmp_path / "other", [[64, 64]])
    with pytest.raises(ValueError, match="dataset="):
        MLMLoader(other, LoaderConfig(batch_size=16)).load_state_dict(state)
    with pytest.raises(ValueError, match="format_version"):
        MLMLoader(uneven, LoaderConfig(batch_size=16)).load_state_dict({**state, "format_version": 99})
    with pytest.raises(ValueError, match="whole number of batches"):
        MLMLoader(uneven, LoaderConfig(batch_size=16)).load_state_dict({**state, "sequences_consumed": 5})
    ok = MLMLoader(uneven, LoaderConfig(batch_size=16, num_workers=2))
    ok.load_state_dict(state)  # another worker count is fine


def test_iterating_the_loader_leaves_the_global_rng_alone(uneven):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    for workers in (0, 2):
        loader = MLMLoader(uneven, LoaderConfig(batch_size=16, seed=1, num_workers=workers))
        collect(loader, limit=2)
    assert torch.equal(torch.rand(3), want)
