"""The loader's order: one invariant checker applied to several configurations, and masks independent of how
batches are cut (workers, batch size, masking place)."""
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import build_dataset, collect, dataset_uids

from maskstream.loader.order import LAYOUTS, RecordTable, cut_partitions, epoch_order, plan_epoch
from maskstream.loader.stream import LoaderConfig, MLMLoader


def epoch_uids(root, config, world_size, epoch):
    """Per rank: the list of uids of each batch of `epoch`, plus the loader of rank 0 (for its stats)."""
    per_rank, loaders = [], []
    for rank in range(world_size):
        loader = MLMLoader(root, config, rank=rank, world_size=world_size)
        loader.set_epoch(epoch)
        per_rank.append([b["uids"].tolist() for b in collect(loader)])
        loaders.append(loader)
    return per_rank, loaders[0]


def check_order_invariants(root, config, world_size):
    """Every sequence once per epoch, ranks disjoint and equal, reproducible, different across epochs."""
    all_uids = set(dataset_uids(root))
    first, loader = epoch_uids(root, config, world_size, epoch=0)
    stats = loader.stats[0]
    steps = {len(batches) for batches in first}
    assert steps == {loader.batches_per_epoch}, "every rank must yield the same number of batches"
    assert all(len(b) == config.batch_size for batches in first for b in batches)
    seen = Counter(u for batches in first for b in batches for u in b)
    if config.remainder == "drop":
        assert max(seen.values()) == 1, "ranks overlap or a sequence repeats"
        assert set(seen) <= all_uids and len(all_uids - set(seen)) == stats["dropped"]
    else:
        assert set(seen) == all_uids, "wrap must cover every sequence"
        assert sum(seen.values()) - len(seen) == stats["wrapped"]
    again, _ = epoch_uids(root, config, world_size, epoch=0)
    assert again == first, "the same (seed, epoch) must give the same order"
    second, _ = epoch_uids(root, config, world_size, epoch=1)
    assert second != first, "the order must change across epochs"
    if config.remainder == "drop" and stats["dropped"]:
        left_out = lambda run: all_uids - {u for bs in run for b in bs for u in b}  # noqa: E731
        assert left_out(second) != left_out(first), "the dropped sequences must differ across epochs"


@pytest.mark.parametrize("batch_size,world_size,num_workers,remainder", [
    (16, 1, 0, "drop"),
    pytest.param(16, 2, 2, "drop", marks=pytest.mark.slow),       # worker processes: seconds each
    pytest.param(7, 3, 1, "wrap", marks=pytest.mark.slow),
    pytest.param(50, 4, 3, "drop", marks=pytest.mark.slow),       # 10 records, 4 ranks x 3 workers:
                                                                  # fewer records than readers
    (100, 3, 0, "wrap"),
])
def test_order_invariants_hold_for_every_configuration(uneven, batch_size, world_size, num_workers, remainder):
    check_order_invariants(uneven, LoaderConfig(batch_size=batch_size, num_workers=num_workers,
                                                remainder=remainder), world_size)


def test_order_is_a_pure_function_of_seed_and_epoch(uneven):
    table = RecordTable.from_index(MLMLoader(uneven, LoaderConfig()).index)
    plan = lambda seed, epoch: plan_epoch(table, seed=seed, epoch=epoch, batch_size=8, world_size=2,  # noqa: E731
                                          remainder="drop")
    assert plan(0, 3).records.tolist() == plan(0, 3).records.tolist()
    assert plan(0, 3).records.tolist() != plan(1, 3).records.tolist()
    assert sorted(plan(5, 9).records.tolist()) == list(range(len(table.sequences)))


def test_batches_do_not_depend_on_the_worker_count(uneven):
    runs = [collect(MLMLoader(uneven, LoaderConfig(batch_size=16, num_workers=w))) for w in (0, 1, 2, 3)]
    for run in runs[1:]:
        assert len(run) == len(runs[0])
        for a, b in zip(runs[0], run, strict=False):
            assert all(torch.equal(a[k], b[k]) for k in a)


def per_uid_masks(batches):
    return {int(u): (ids.tolist(), labels.tolist()) for b in batches
            for u, ids, labels in zip(b["uids"], b["input_ids"], b["labels"], strict=True)}


def test_masks_are_identical_for_any_workers_batch_size_and_masking_place(uneven):
    reference = per_uid_masks(collect(MLMLoader(uneven, LoaderConfig(batch_size=16, seed=3))))
    for cfg in (LoaderConfig(batch_size=16, seed=3, num_workers=1),
                LoaderConfig(batch_size=7, seed=3, num_workers=2),
                LoaderConfig(batch_size=32, seed=3, num_workers=2, mask_on="worker"),
                LoaderConfig(batch_size=5, seed=3, num_workers=0, remainder="wrap")):
        other = per_uid_masks(collect(MLMLoader(uneven, cfg)))
        common = reference.keys() & other.keys()
        assert len(common) > 400
        assert all(reference[u] == other[u] for u in common), cfg


def test_masks_change_every_epoch_and_keep_labels_consistent(uneven):
    loader = MLMLoader(uneven, LoaderConfig(batch_size=16))
    e0, e1 = per_uid_masks(collect(loader)), per_uid_masks(collect(loader))
    assert loader.epoch == 2
    assert sum(e0[u][1] != e1[u][1] for u in e0.keys() & e1.keys()) > 0.9 * len(e0)
    batch = collect(MLMLoader(uneven, LoaderConfig(batch_size=16)), limit=1)[0]
    masked = batch["labels"] != -100
    assert batch["attention_mask"].dtype == torch.bool and batch["uids"].dtype == torch.int64
    assert not (masked & ~batch["attention_mask"]).any(), "padding is never selected"
    assert (batch["input_ids"][~masked] != 103).all()


def test_static_dataset_uses_stored_copy_epoch_mod_k(tmp_path, data_dir):
    from helpers import VOCAB

    from maskstream.loader import masking
    root = build_dataset(tmp_path / "static", [[40, 24], [30]], static_copies=2, seed=7)
    loader = MLMLoader(root, LoaderConfig(batch_size=8, seed=7))
    epochs = [per_uid_masks(collect(loader)) for _ in range(3)]
    assert epochs[0] != epochs[1]
    common = epochs[0].keys() & epochs[2].keys()
    assert common and all(epochs[0][u] == epochs[2][u] for u in common), "epoch 2 reuses copy 0"
    dynamic = MLMLoader(build_dataset(tmp_path / "dyn", [[40, 24], [30]]), LoaderConfig(batch_size=8, seed=7))
    dynamic.set_epoch(1)
    dyn = per_uid_masks(collect(dynamic))
    common = epochs[1].keys() & dyn.keys()
    assert common and all(epochs[1][u] == dyn[u] for u in common), "stored copy 1 == dynamic epoch 1"
    with pytest.raises(ValueError, match="static masks"):
        MLMLoader(root, LoaderConfig(), masking=masking.MaskingConfig(mask_prob=0.3))
    assert VOCAB.mask_id == 103


def synthetic_table(sizes) -> RecordTable:
    """A record table without shards (the order needs only the sequence counts)."""
    r = len(sizes)
    return RecordTable(np.zeros(r, np.int64), np.arange(r), np.arange(r) + 1, np.asarray(sizes, np.int64))


def waste(order, partition_segments) -> int:
    """Sequences of the records a partition touches that it does not consume."""
    sizes = dict(zip(order.records.tolist(), np.diff(order.starts).tolist(), strict=True))
    used = Counter()
    for s in partition_segments:
        used[s.record] += s.hi - s.lo
    return sum(sizes[r] - k for r, k in used.items())


@pytest.mark.parametrize("seed", range(40))
def test_partitions_cut_on_record_boundaries_take_each_sequence_once_and_never_waste_more(seed):
    """Random record sizes and shapes: every partition holds exactly S sequences, no sequence twice, the
    N - P*S left out; the worst partition reads no more beyond what it consumes than the cut at q*S does."""
    rng = np.random.default_rng(seed)
    largest = int(rng.choice([8, 64, 512]))
    sizes = rng.integers(1, largest + 1, size=int(rng.integers(3, 60)))
    if seed % 2:
        sizes[:-1] = largest  # a writer's records: all full but a shard's last
    partitions = int(rng.choice([1, 2, 4, 8, 16]))
    g = partitions * int(rng.choice([1, 2, 8, 32]))
    n = int(sizes.sum())
    if n < g:
        pytest.skip("fewer sequences than one global batch")
    size = n // g * g // partitions
    order = epoch_order(synthetic_table(sizes), seed=seed, epoch=0)
    worst = {}
    for layout in LAYOUTS:
        parts = cut_partitions(order, partitions, size, layout)
        taken = Counter()
        for q in range(partitions):
            segments = parts.segments(q, 0, size)
            assert sum(s.hi - s.lo for s in segments) == size
            taken.update((s.record, i) for s in segments for i in range(s.lo, s.hi))
        assert max(taken.values()) == 1 and len(taken) == partitions * size
        worst[layout] = max(waste(order, parts.segments(q, 0, size)) for q in range(partitions))
    assert worst["records"] <= worst["contiguous"]


def test_on_full_records_a_partition_reads_at_most_one_record_it_does_not_wholly_consume():
    """The bench's SOTU shape (4 shards of 8 records of 512 and one of ~80; 8 partitions of 2080): the cut at
    q*S makes a partition read up to two records it consumes part of; cut on record boundaries, one."""
    sizes = ([512] * 8 + [82]) * 3 + [512] * 8 + [79]
    size = sum(sizes) // 256 * 256 // 8
    for epoch in range(20):
        order = epoch_order(synthetic_table(sizes), seed=0, epoch=epoch)
        parts = cut_partitions(order, 8, size)
        assert max(waste(order, parts.segments(q, 0, size)) for q in range(8)) < 512
    plain = cut_partitions(order, 8, size, "contiguous")
    assert max(waste(order, plain.segments(q, 0, size)) for q in range(8)) > 512
