"""Mixtures: every global batch holds each source's share to within one sequence, the long-run share is exact,
each source runs its own passes (fresh order and masks, no repeat within a pass), and the batches are a pure
function of (seed, step) for any worker count, world size or resume point."""
import json
from collections import Counter
from fractions import Fraction

import pytest
import torch
from helpers import build_dataset, collect

from maskstream.errors import UserError
from maskstream.loader import format as fmt
from maskstream.loader.mixture import MixPlan, MixSource, Mixture
from maskstream.loader.order import RecordTable
from maskstream.loader.stream import LoaderConfig, MLMLoader


@pytest.fixture
def sources(tmp_path, data_dir):
    """Three datasets of 300, 120 and 40 sequences, and a mixture file naming them by relative path."""
    roots = {"big": build_dataset(tmp_path / "big", [[64, 64, 40], [64, 68]]),
             "mid": build_dataset(tmp_path / "mid", [[50, 70]]),
             "small": build_dataset(tmp_path / "small", [[17, 23]])}
    spec = {"sources": [{"path": "big", "weight": 0.5}, {"path": "mid", "weight": 0.3, "name": "middle"},
                        {"path": "small/", "weight": 0.2}], "epoch_sequences": 200}
    (tmp_path / "mix.json").write_text(json.dumps(spec))
    return tmp_path / "mix.json", roots


def global_batches(data, world, batch, *, epochs=(0,), state=None, workers=0, partitions=4, seed=9):
    out = []
    for epoch in epochs:
        per_rank = []
        for rank in range(world):
            loader = MLMLoader(data, LoaderConfig(batch_size=batch, partitions=partitions, seed=seed,
                                                  num_workers=workers), rank=rank, world_size=world)
            loader.set_epoch(epoch)
            if state is not None:
                loader.load_state_dict(state)
            per_rank.append(collect(loader))
        out += [{k: torch.cat([r[s][k] for r in per_rank]) for k in per_rank[0][s]} for s in range(len(per_rank[0]))]
    return out


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_every_global_batch_holds_the_shares_to_within_one_sequence(sources):
    mix_file, _ = sources
    batches = global_batches(mix_file, 2, 10, epochs=(0, 1))
    assert len(batches) == 2 * (200 // 20)
    for b in batches:
        counts = Counter(b["sources"].tolist())
        for i, w in enumerate((0.5, 0.3, 0.2)):
            assert abs(counts[i] - w * 20) < 1, counts


@pytest.mark.parametrize("weights,G", [((0.7, 0.31), 16), ((1, 1, 1), 32), ((0.05, 0.15, 0.3, 0.5), 24),
                                        ((3, 1e-3), 8)])
def test_the_long_run_share_is_exact_and_every_step_within_one(weights, G):
    tables = tuple(RecordTable(*(torch.zeros(1, dtype=torch.int64).numpy() for _ in range(3)),
                               torch.tensor([1000]).numpy()) for _ in weights)
    share = tuple(Fraction(str(w)) / sum(Fraction(str(x)) for x in weights) for w in weights)
    plan = MixPlan(tables, share, G, 4, 0, 10)
    for step in (1, 7, 500, 3001):
        cur = plan.cursor(step)
        assert sum(cur.taken) == step * G
        assert all(abs(a - float(w) * step * G) <= 1 for a, w in zip(cur.taken, share, strict=True)), cur.taken
        assert all(sum(js) == a for js, a in zip(cur.taken_by, cur.taken, strict=True))
        assert all(max(js) - min(js) <= 4 for js in cur.taken_by), "each source reaches every partition evenly"
    cur = plan.cursor(0)
    for _ in range(200):
        counts, by = plan.advance(cur)
        assert all(abs(c - float(w) * G) < 1 for c, w in zip(counts, share, strict=True))
        assert [sum(col) for col in zip(*by, strict=True)] == [G // 4] * 4, "every partition gets g seats"


def test_a_small_source_never_repeats_within_a_pass_and_gets_fresh_order_and_masks_each_pass(sources):
    mix_file, _ = sources
    batches = global_batches(mix_file, 1, 20, epochs=(0, 1, 2))  # the small source: 40 a pass, 4 a step
    seen = [(u, labels) for b in batches for u, labels, src in
            zip(b["uids"].tolist(), b["labels"].tolist(), b["sources"].tolist(), strict=True) if src == 2]
    assert len(seen) == 3 * 10 * 4
    passes = [dict(seen[k * 40:(k + 1) * 40]) for k in range(3)]  # 1 per partition a step: passes align
    assert all(len(p) == 40 for p in passes), "a pass repeats a sequence"
    assert passes[0].keys() == passes[1].keys() == passes[2].keys()
    assert list(passes[0]) != list(passes[1]), "a fresh order each pass"
    assert sum(passes[0][u] != passes[1][u] for u in passes[0]) > 0.9 * 40, "fresh masks each pass"


@pytest.mark.slow
def test_mixture_batches_do_not_depend_on_workers_world_size_or_resume(sources):
    mix_file, _ = sources
    reference = global_batches(mix_file, 2, 10, epochs=(1,))
    assert same(global_batches(mix_file, 4, 5, epochs=(1,), workers=2), reference)
    first = MLMLoader(mix_file, LoaderConfig(batch_size=10, partitions=4, seed=9), world_size=2)
    first.set_epoch(1)
    collect(first, limit=6)
    tail = global_batches(mix_file, 1, 20, epochs=(1,), state=first.state_dict())
    assert same(tail, reference[6:])


def test_a_mixture_from_python_equals_the_same_mixture_from_a_file(sources):
    mix_file, roots = sources
    mixture = Mixture(sources=(MixSource(path=str(roots["big"]), weight=5, name="big"),
                               MixSource(path=str(roots["mid"]), weight=3, name="middle"),
                               MixSource(path=str(roots["small"]), weight=2, name="small")), epoch_sequences=200)
    a, b = global_batches(mixture, 1, 20), global_batches(mix_file, 1, 20)
    assert same(a, b)
    loader = MLMLoader(mixture, LoaderConfig(batch_size=20))
    assert loader.state_dict()["dataset"] == MLMLoader(mix_file, LoaderConfig(batch_size=20)).state_dict()["dataset"]
    collect(loader)
    stats = loader.stats[0]["sources"]
    assert {k: v["sequences"] for k, v in stats.items()} == {"big": 100, "middle": 60, "small": 40}


def test_repeat_sets_the_shares_and_the_epoch(sources):
    _, roots = sources
    mixture = Mixture(sources=(MixSource(path=str(roots["big"]), repeat=1), MixSource(path=str(roots["small"]),
                                                                                   repeat=3)))
    loader = MLMLoader(mixture, LoaderConfig(batch_size=20, remainder="wrap"))
    assert loader.batches_per_epoch == -(-(300 + 120) // 20)
    collect(loader)
    assert loader.stats[0]["sources"]["small"]["sequences"] in range(118, 123)


def retokenized(root, **changes):
    index = json.loads((root / fmt.INDEX_FILE).read_text())
    for key, value in changes.items():
        if key == "sha256":
            index["tokenizer"]["sha256"] = value
        else:
            index[key] = value
    fmt.write_index(str(root), index)


@pytest.mark.parametrize("change,message", [
    ({"sha256": "other"}, "share the tokenizer sha256, but big .* has 'test' and small .* has 'other'"),
    ({"seq_len": 256}, "share the sequence length, but big .* has 128 and small .* has 256"),
])
def test_sources_of_another_tokenizer_or_length_are_refused_naming_both(sources, change, message):
    mix_file, roots = sources
    retokenized(roots["small"], **change)
    with pytest.raises(UserError, match=message):
        MLMLoader(mix_file, LoaderConfig(batch_size=20))


@pytest.mark.parametrize("spec,message", [
    ({"sources": [{"path": "big", "weight": 1}, {"path": "mid", "repeat": 2}]}, "every source needs a weight"),
    ({"sources": [{"path": "big", "weight": -1}]}, "must be a number > 0"),
    ({"sources": [{"path": "big", "weight": 1}], "epochs": 3}, "unknown keys \\['epochs'\\]"),
    ({"sources": [{"path": "big", "weight": 1}, {"path": "big", "weight": 1}]}, "names .* repeat"),
])
def test_a_bad_mixture_file_is_refused_in_one_line(sources, spec, message):
    mix_file, _ = sources
    mix_file.write_text(json.dumps(spec))
    with pytest.raises(UserError, match=message):
        MLMLoader(mix_file, LoaderConfig())


@pytest.mark.slow
def test_masking_in_the_workers_gives_the_device_masks_and_epoch_tokens_sizes_the_epoch(sources):
    mix_file, roots = sources
    on_device = collect(MLMLoader(mix_file, LoaderConfig(batch_size=20, seed=9)))
    in_workers = collect(MLMLoader(mix_file, LoaderConfig(batch_size=20, seed=9, num_workers=1, mask_on="worker")))
    assert same(on_device, in_workers)
    mixture = Mixture(sources=(MixSource(path=str(roots["big"]), weight=1), MixSource(path=str(roots["mid"]),
                                                                                    weight=1)), epoch_tokens=10_000)
    loader = MLMLoader(mixture, LoaderConfig(batch_size=10))
    per_seq = sum(loader.datasets[i].index["counts"]["tokens"] / n for i, n in ((0, 300), (1, 120))) / 2
    assert loader.batches_per_epoch == -(-10_000 // per_seq) // 10


def test_a_state_of_another_mixture_is_refused(sources):
    mix_file, _ = sources
    state = MLMLoader(mix_file, LoaderConfig(batch_size=20)).state_dict()
    spec = json.loads(mix_file.read_text())
    spec["sources"][0]["weight"] = 0.6  # another share: other batches from the same step on
    mix_file.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="dataset=.* in the checkpoint but .* here; resume on the dataset or "
                                         "mixture the checkpoint was trained on"):
        MLMLoader(mix_file, LoaderConfig(batch_size=20)).load_state_dict(state)


def test_a_resumed_mixture_replays_no_step_before_its_state(sources, monkeypatch):
    """The state carries the cursors of its epoch's start and of its step: a fresh process resuming at step k of
    epoch 3 advances only from there, and yields the batches an uninterrupted run yields."""
    mix_file, _ = sources
    first = MLMLoader(mix_file, LoaderConfig(batch_size=20, partitions=4, seed=9))
    first.set_epoch(3)
    collect(first, limit=4)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds
    assert [c[0] for c in state["mix_cursors"]] == [30, 34]
    reference = global_batches(mix_file, 1, 20, epochs=(3,))
    steps = []
    advance = MixPlan.advance
    monkeypatch.setattr(MixPlan, "advance", lambda self, cur: steps.append(cur.step) or advance(self, cur))
    resumed = MLMLoader(mix_file, LoaderConfig(batch_size=10, partitions=4, seed=9), world_size=2)
    resumed.load_state_dict(state)
    rest = global_batches(mix_file, 2, 10, epochs=(3,), state=state)
    assert same(rest, reference[4:])
    steps.clear()
    assert same(collect(resumed), [{k: v[:10] for k, v in b.items()} for b in reference[4:]])  # rank 0's rows
    assert min(steps) >= 30, "replayed steps before the state's epoch"


@pytest.mark.parametrize("damage", [lambda c: c[2].__setitem__(0, c[2][0] + 1),   # taken != sum over partitions
                                    lambda c: c[1].__setitem__(0, c[1][0] + 1),   # credits no longer sum to 0
                                    lambda c: c[3].pop()])                        # a source missing
def test_a_damaged_mixture_cursor_is_refused(sources, damage):
    mix_file, _ = sources
    loader = MLMLoader(mix_file, LoaderConfig(batch_size=20, partitions=4))
    collect(loader, limit=3)
    state = loader.state_dict()
    damage(state["mix_cursors"][-1])
    with pytest.raises(ValueError, match="mix_cursors: .*does not fit this mixture|is not \\[step"):
        MLMLoader(mix_file, LoaderConfig(batch_size=20, partitions=4)).load_state_dict(state)
