"""Mask-rate schedules: pure functions of (step, total); the rate goes through the keyed rule; mask-only."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import VOCAB, build_dataset, sotu_sequences

from maskstream.errors import UserError
from maskstream.loader.masking import IGNORE_INDEX, SELECTIONS, MaskingConfig, mask_batch
from maskstream.loader.schedule import parse_schedule
from maskstream.loader.stream import LoaderConfig, MLMLoader


def batch(n=48):
    tokens, lengths, word_starts, uids = sotu_sequences(n)
    return (torch.from_numpy(tokens), torch.from_numpy(word_starts), torch.from_numpy(lengths.astype(np.int64)),
            torch.from_numpy(uids.view(np.int64)))


def test_schedules_run_from_the_start_rate_at_step_0_to_the_end_rate_at_the_last_step():
    linear, cosine = parse_schedule("linear:0.3:0.15"), parse_schedule("cosine:0.3:0.15")
    assert [linear(s, 11) for s in (0, 5, 10)] == [0.3, 0.225, 0.15]
    assert [cosine(s, 11) for s in (0, 5, 10)] == [0.3, 0.225, 0.15]
    assert cosine(2, 11) > linear(2, 11)  # cosine stays near the start rate longer
    assert {parse_schedule("constant:0.4")(s, 7) for s in range(7)} == {0.4}
    assert linear(0, 1) == 0.3 and parse_schedule("linear:0.3:0.15").spec() == "linear:0.3:0.15"


@pytest.mark.parametrize("text", ["linear:0.3", "constant:0.2:0.1", "exp:0.3:0.1", "linear:0.3:1.5", "cosine:a:b"])
def test_a_malformed_schedule_is_one_clear_line(text):
    with pytest.raises(UserError, match="--mask-schedule"):
        parse_schedule(text)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_a_rate_is_the_keyed_rule_at_that_mask_prob_and_none_keeps_the_config(selection):
    tokens, word_starts, lengths, uids = batch()
    config = MaskingConfig(selection=selection)
    at = lambda cfg, rate=None: mask_batch(tokens, word_starts, lengths, uids, seed=5, epoch=2,  # noqa: E731
                                           config=cfg, vocab=VOCAB, rate=rate)
    for a, b in zip(at(config, 0.3), at(dataclasses.replace(config, mask_prob=0.3)), strict=True):
        assert torch.equal(a, b)  # a pure function of (seed, epoch, uid, rate)
    for a, b in zip(at(config), at(config, 0.15), strict=True):
        assert torch.equal(a, b)
    frac = lambda labels: (labels != IGNORE_INDEX).sum().item() / (lengths - 2).sum().item()  # noqa: E731
    assert frac(at(config, 0.3)[1]) == pytest.approx(0.3, abs=0.02)
    assert frac(at(config, 0.15)[1]) == pytest.approx(0.15, abs=0.02)


def test_mask_only_turns_every_selected_token_into_the_mask_token():
    tokens, word_starts, lengths, uids = batch()
    config = MaskingConfig(mask_token_frac=1.0, random_token_frac=0.0)
    inputs, labels = mask_batch(tokens, word_starts, lengths, uids, seed=1, epoch=0, config=config, vocab=VOCAB)
    selected = labels != IGNORE_INDEX
    assert selected.any() and (inputs[selected] == VOCAB.mask_id).all()
    assert torch.equal(inputs[~selected], tokens[~selected])


def test_the_loader_masks_at_the_rate_it_is_given_and_refuses_a_rate_for_static_masks(tmp_path):
    root = build_dataset(tmp_path / "dyn", [[32, 32]])
    loader = MLMLoader(root, LoaderConfig(batch_size=16, seed=2))
    plain = next(iter(loader))
    loader.set_epoch(0)
    loader.set_mask_rate(0.4)
    high = next(iter(loader))
    assert (high["labels"] != IGNORE_INDEX).sum() > 2 * (plain["labels"] != IGNORE_INDEX).sum()
    static = MLMLoader(build_dataset(tmp_path / "static", [[32]], static_copies=2), LoaderConfig(batch_size=16))
    with pytest.raises(UserError, match="static masks"):
        static.set_mask_rate(0.3)
