"""Training recipes: a mask-rate schedule is logged and resumes exactly; mask-only; refusals."""
from __future__ import annotations

import pytest
import torch
from helpers import build_dataset

from maskstream.errors import UserError
from maskstream.loader.schedule import parse_schedule
from maskstream.trainer import checkpoint, run_folder
from maskstream.trainer.train import build, close, main, parse_args, train


def flags(train_dir, out, *extra):
    return ["--data", str(train_dir), "--out", str(out), "--model-size", "tiny", "--batch-size", "16",
            "--seed", "3", "--log-every", "1", "--no-progress", *extra]


def losses_and_rates(out) -> list[tuple]:
    return [(r["step"], r["loss"], r["mask_rate"]) for r in run_folder.read_metrics(out) if "loss" in r]


@pytest.mark.slow
def test_a_scheduled_run_logs_each_steps_rate_and_resumes_bit_for_bit(sotu_split, tmp_path):
    train_dir, _ = sotu_split
    common = ("--max-steps", "4", "--save-every", "2", "--batch-size", "8", "--mask-schedule", "linear:0.4:0.15")
    assert main(flags(train_dir, tmp_path / "whole", *common)) == 0
    run = build(parse_args(flags(train_dir, tmp_path / "split", *common)))
    train(run, stop_at=2)
    close(run)
    assert main(flags(train_dir, tmp_path / "split", *common, "--resume")) == 0
    whole = losses_and_rates(tmp_path / "whole")
    schedule = parse_schedule("linear:0.4:0.15")
    assert [rate for _, _, rate in whole] == [schedule(s, 4) for s in range(4)]  # the rate each step trained at
    assert whole[0][2] == 0.4 and whole[-1][2] == 0.15
    assert losses_and_rates(tmp_path / "split") == whole
    a = checkpoint.load(checkpoint.latest(tmp_path / "whole"))["model"]
    b = checkpoint.load(checkpoint.latest(tmp_path / "split"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_without_a_schedule_the_datasets_rate_is_logged_and_mask_only_reaches_the_loader(sotu_split, tmp_path):
    train_dir, _ = sotu_split
    run = build(parse_args(flags(train_dir, tmp_path / "run", "--max-steps", "1", "--mask-only")))
    assert (run.loader.masking.mask_token_frac, run.loader.masking.random_token_frac) == (1.0, 0.0)
    train(run)
    close(run)
    assert losses_and_rates(tmp_path / "run")[0][2] == 0.15


def test_a_schedule_or_mask_only_is_refused_on_static_masks(tmp_path):
    static = build_dataset(tmp_path / "static", [[32]], static_copies=2)
    for flag in (["--mask-schedule", "constant:0.3"], ["--mask-only"]):
        with pytest.raises(UserError, match="static masks"):
            main(flags(static, tmp_path / "run", "--max-steps", "1", *flag))


def test_a_malformed_schedule_flag_is_refused_before_anything_is_built(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(flags(tmp_path, tmp_path / "run", "--max-steps", "1", "--mask-schedule", "linear:0.3"))
    assert "--mask-schedule 'linear:0.3' is malformed; write one of constant:0.15" in capsys.readouterr().err


def test_attention_defaults_to_doc_and_to_full_for_a_transformers_model(tmp_path):
    from maskstream.trainer.train import TrainConfig
    common = dict(data=str(tmp_path), out=str(tmp_path / "run"), max_steps=1)
    assert TrainConfig(**common).attention == "doc"
    assert TrainConfig(**common, hf_config="bert.json").attention == "full"
    with pytest.raises(ValueError, match="--attention doc needs maskstream's encoder"):
        TrainConfig(**common, hf_config="bert.json", attention="doc")
