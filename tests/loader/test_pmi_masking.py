"""--selection pmi in the masking rule: units masked whole, the exact count, 80/10/10 per unit, the same bits on
the dense and sparse paths, static copies; a dataset without unit starts is refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import VOCAB, build_dataset, sotu_sequences

from maskstream.errors import UserError
from maskstream.loader.masking import MaskingConfig, _corrupt, mask_batch, select, sequence_keys, static_masks

PMI = MaskingConfig(selection="pmi")


@pytest.fixture(scope="module")
def batch():
    """600 SOTU rows with unit starts: word starts where about a third of the words are joined to the word
    before them (units of 1..4 words, as PMI n-grams would make)."""
    tokens, lengths, word_starts, uids = sotu_sequences(600)
    rng = np.random.default_rng(0)
    joined = word_starts & (rng.random(word_starts.shape) < 0.35)
    joined[:, :2] = False
    units = word_starts & ~joined
    return tuple(torch.from_numpy(a) for a in (tokens.astype(np.int64), units, lengths.astype(np.int64),
                                               uids.view(np.int64)))


def unit_ids(units: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(units.to(torch.int64), dim=1)   # (B, L): the unit each position belongs to


@pytest.mark.slow
def test_units_are_masked_whole_at_the_exact_count_with_80_10_10_per_unit(batch):
    tokens, units, lengths, uids = batch
    inputs, labels = mask_batch(tokens, units, lengths, uids, seed=3, epoch=1, config=PMI, vocab=VOCAB)
    selected = labels != -100
    ids = unit_ids(units)
    eligible = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]) & ~torch.isin(
        tokens, torch.tensor(VOCAB.special_ids))
    masked_units = mixed = kinds = 0
    counts = {"mask": 0, "random": 0, "same": 0}
    for r in range(len(tokens)):
        for u in torch.unique(ids[r][selected[r]]).tolist():
            at = (ids[r] == u) & eligible[r]
            mixed += int(not selected[r][at].all())       # a unit is taken whole or not at all
            masked = inputs[r][at] == VOCAB.mask_id
            kinds += int(masked.any() and not masked.all())  # one action for the whole unit
            kind = "mask" if masked.all() else "same" if torch.equal(inputs[r][at], tokens[r][at]) else "random"
            counts[kind] += 1
            masked_units += 1
    assert mixed == 0 and kinds == 0
    assert masked_units > 5000
    assert abs(counts["mask"] / masked_units - 0.8) < 0.03 and abs(counts["random"] / masked_units - 0.1) < 0.02
    # exact count: round(p * n) tokens per row, give or take half of the last unit taken
    n = eligible.sum(1).double()
    target = torch.floor(n * 0.15 + 0.5)
    assert (selected.sum(1) - target).abs().max() <= 4
    assert abs(selected.sum().item() / n.sum().item() - 0.15) < 0.005


def test_word_selection_is_unchanged_and_pmi_with_word_units_selects_the_same(batch):
    tokens, units, lengths, uids = batch
    keys = sequence_keys(uids, seed=5, epoch=2)
    word = select(tokens, units, lengths, keys, config=MaskingConfig(selection="word"), vocab=VOCAB)
    assert torch.equal(word, select(tokens, units, lengths, keys, config=PMI, vocab=VOCAB))


def test_dense_and_sparse_paths_and_static_copies_agree_for_pmi(batch):
    from maskstream.loader.masking import _eligible, _start_of, _unit_starts
    tokens, units, lengths, uids = (x[:300] for x in batch)
    keys = sequence_keys(uids, seed=2, epoch=7)
    selected = select(tokens, units, lengths, keys, config=PMI, vocab=VOCAB)
    unit_of = _start_of(_unit_starts(_eligible(tokens, lengths, VOCAB), units, keys, PMI))
    dense = _corrupt(tokens, selected, keys, config=PMI, vocab=VOCAB, dense=True, unit_of=unit_of)
    sparse = _corrupt(tokens, selected, keys, config=PMI, vocab=VOCAB, dense=False, unit_of=unit_of)
    assert torch.equal(dense, sparse)
    chosen, inputs = static_masks(tokens, units, lengths, uids, seed=2, copies=2, config=PMI, vocab=VOCAB)
    again, _ = mask_batch(tokens, units, lengths, uids, seed=2, epoch=1, config=PMI, vocab=VOCAB)
    assert torch.equal(inputs[:, 1], again)


def test_a_dataset_without_unit_starts_is_refused_for_pmi(tmp_path):
    from maskstream.loader.stream import LoaderConfig, MLMLoader
    root = build_dataset(tmp_path / "plain", [[16]])
    with pytest.raises(UserError, match=r"no PMI masking units.*--selection pmi"):
        MLMLoader(str(root), LoaderConfig(batch_size=4), masking=PMI)
