"""The training loop on real SOTU shards: it learns, checkpoints round-trip, resume is exact, DDP stays in sync."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskstream.errors import UserError
from maskstream.trainer import checkpoint, evaluate, run_folder
from maskstream.trainer.train import build, close, main, parse_args, train

ROOT = Path(__file__).resolve().parents[2]


def flags(train_dir, out, *extra):
    return ["--data", str(train_dir), "--out", str(out), "--model-size", "tiny", "--batch-size", "8",
            "--seed", "3", "--log-every", "1", "--no-progress", *extra]


def metrics(out) -> list[dict]:
    return run_folder.read_metrics(Path(out))


@pytest.mark.slow
def test_loss_decreases_on_real_text(sotu_split, tmp_path):
    train_dir, held_out = sotu_split
    out = tmp_path / "run"
    assert main(flags(train_dir, out, "--max-steps", "30", "--eval-data", str(held_out), "--eval-every", "30",
                      "--lr", "2e-3", "--batch-size", "16")) == 0
    rows = metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 30 and {"step", "epoch", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.5  # from ln(30522) ~ 10.3 down by well over a nat
    held = [r for r in rows if "eval_loss" in r][-1]
    assert held["eval_loss"] < 9.0 and 0 < held["eval_accuracy"] <= 1
    assert held["eval_perplexity"] == pytest.approx(2.718281828 ** held["eval_loss"], rel=1e-6)
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "tokenizer.json").is_file()  # copied from the dataset, for fill-mask
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["model_size"] == "tiny" and config["model"]["vocab_size"] == 30522


@pytest.mark.slow
def test_checkpoint_round_trip_restores_model_and_fixed_mask_evaluation(sotu_split, tmp_path):
    train_dir, held_out = sotu_split
    out = tmp_path / "run"
    run = build(parse_args(flags(train_dir, out, "--max-steps", "3")))
    train(run)
    close(run)
    assert [p.name for p in checkpoint.checkpoints(out)] == ["ckpt-0000003.pt"]
    assert (out / "ckpt-0000003.json").is_file()  # its checksum
    ckpt = checkpoint.load(checkpoint.latest(out))
    assert {"model", "optimizer", "scheduler", "loader", "rng", "config", "step"} <= set(ckpt)
    assert ckpt["loader"]["sequences_consumed"] == 24 and ckpt["config"]["train"]["seed"] == 3
    model, _ = evaluate.load_run(out)
    for name, tensor in run.raw_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    a = evaluate.evaluate(model, evaluate.eval_loader(str(held_out), batch_size=8), device=torch.device("cpu"))
    b = evaluate.evaluate(model, evaluate.eval_loader(str(held_out), batch_size=8), device=torch.device("cpu"))
    assert a == b  # the evaluation mask is fixed


@pytest.mark.slow
def test_resume_continues_with_exactly_the_same_losses(sotu_split, tmp_path):
    train_dir, _ = sotu_split
    # dropout on, so restoring the RNG state matters; batch 48 gives 5 batches per epoch, so the 8 steps
    # cross an epoch boundary after the resume point
    common = ("--max-steps", "8", "--save-every", "4", "--dropout", "0.1", "--batch-size", "48")
    assert main(flags(train_dir, tmp_path / "whole", *common)) == 0
    run = build(parse_args(flags(train_dir, tmp_path / "split", *common)))
    train(run, stop_at=4)  # interrupted after the step-4 checkpoint
    close(run)
    assert main(flags(train_dir, tmp_path / "split", *common, "--resume")) == 0
    whole = [(r["step"], r["loss"]) for r in metrics(tmp_path / "whole") if "loss" in r]
    split = [(r["step"], r["loss"]) for r in metrics(tmp_path / "split") if "loss" in r]
    assert [s for s, _ in split] == list(range(1, 9))
    assert split == whole  # bit for bit, not approximately
    a = checkpoint.load(checkpoint.latest(tmp_path / "whole"))["model"]
    b = checkpoint.load(checkpoint.latest(tmp_path / "split"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_new_run_refuses_a_folder_with_checkpoints_unless_resumed(sotu_split, tmp_path):
    train_dir, _ = sotu_split
    assert main(flags(train_dir, tmp_path / "run", "--max-steps", "1")) == 0
    with pytest.raises(FileExistsError, match="--resume"):
        main(flags(train_dir, tmp_path / "run", "--max-steps", "1"))


def test_masking_flag_must_match_the_dataset(sotu_split, tmp_path):
    train_dir, _ = sotu_split
    with pytest.raises(ValueError, match="holds dynamic masks"):
        main(flags(train_dir, tmp_path / "run", "--max-steps", "1", "--masking", "static"))


@pytest.mark.slow
def test_two_process_ddp_with_gloo_trains_and_keeps_replicas_identical(sotu_split, tmp_path):
    train_dir, _ = sotu_split
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer", *flags(train_dir, out, "--max-steps", "6", "--dropout", "0.1", "--device", "cpu")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert rows[-1] == {"step": 6, "replicas_identical": True}
    ckpt = checkpoint.load(checkpoint.latest(out))
    assert ckpt["config"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["loader"]["sequences_consumed"] == 6 * 8  # per rank: 6 steps of 8


def test_resume_passes_over_a_damaged_latest_checkpoint_and_is_still_exact(sotu_split, tmp_path, capsys):
    train_dir, _ = sotu_split
    common = ("--max-steps", "6", "--save-every", "3", "--dropout", "0.1")
    assert main(flags(train_dir, tmp_path / "whole", *common)) == 0
    split = tmp_path / "split"
    assert main(flags(train_dir, split, *common)) == 0
    latest = checkpoint.latest(split)
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the step-6 checkpoint
    latest.write_bytes(bytes(data))
    (split / f".{latest.name}.tmp999").write_bytes(b"half a checkpoint")  # a killed write's leftover
    capsys.readouterr()
    assert main(flags(train_dir, split, *common, "--resume")) == 0
    err = capsys.readouterr().err
    assert "skipping ckpt-0000006.pt does not match its sha256" in err and ".ckpt-0000006.pt.tmp999" in err
    assert not list(split.glob(".*tmp*"))
    whole = [(r["step"], r["loss"]) for r in metrics(tmp_path / "whole") if "loss" in r]
    again = [(r["step"], r["loss"]) for r in metrics(split) if "loss" in r]
    assert again == whole  # steps 4-6 retrained from the step-3 checkpoint, bit for bit


def nan_flags(train_dir, out, *extra):
    # an absurd learning rate with no clipping: step 1 blows the weights up, step 2's loss is NaN
    return flags(train_dir, out, "--lr", "1e6", "--clip", "0", "--warmup", "0", "--save-every", "1", *extra)


def test_a_nan_loss_stops_the_run_with_one_line_and_no_nan_checkpoint(sotu_split, tmp_path, capsys):
    train_dir, _ = sotu_split
    out = tmp_path / "run"
    assert main(nan_flags(train_dir, out, "--max-steps", "5")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("maskstream train: step 2: non-finite loss nan") and "--lr" in err[-1]
    assert [p.name for p in checkpoint.checkpoints(out)] == ["ckpt-0000001.pt"]  # finite, before the NaN
    assert [r["step"] for r in metrics(out)] == [1]


def test_on_nonfinite_skip_drops_the_updates_counts_them_and_gives_up_after_a_streak(sotu_split, tmp_path):
    train_dir, _ = sotu_split
    assert main(nan_flags(train_dir, tmp_path / "skip", "--max-steps", "4", "--on-nonfinite", "skip")) == 0
    rows = metrics(tmp_path / "skip")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 3] and rows[0]["loss"] is not None
    assert all(r["loss"] is None for r in rows[1:])
    ckpt = checkpoint.load(checkpoint.latest(tmp_path / "skip"))
    assert ckpt["step"] == 4 and ckpt["counters"] == {"step": 4, "skipped_steps": 3, "tokens": 4 * 8 * 128,
                                                      "window_loss": 0.0, "window_steps": 0}   # window logged
    assert main(nan_flags(train_dir, tmp_path / "streak", "--max-steps", "20", "--on-nonfinite", "skip")) == 1
    assert checkpoint.latest(tmp_path / "streak").name == "ckpt-0000010.pt"  # 9 skips in a row, then stop


def test_resume_refuses_a_folder_whose_every_checkpoint_is_damaged(sotu_split, tmp_path):
    train_dir, _ = sotu_split
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt-0000004.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
        main(flags(train_dir, out, "--max-steps", "8", "--resume"))


@pytest.mark.slow
def test_a_resume_inside_a_logging_window_logs_what_the_uninterrupted_run_logs(sotu_split, tmp_path, capsys):
    train_dir, _ = sotu_split
    # windows of 3 steps (3, 6, 8); the checkpoint at step 4 cuts the second window after one step
    common = ("--max-steps", "8", "--save-every", "4", "--log-every", "3")
    assert main(flags(train_dir, tmp_path / "whole", *common)) == 0
    closing = capsys.readouterr().out
    assert "trained  8 steps" in closing and f"{tmp_path / 'whole' / 'ckpt-0000008.pt'}" in closing
    assert "loss.png" in closing and "note: resuming" not in closing
    run = build(parse_args(flags(train_dir, tmp_path / "split", *common)))
    train(run, stop_at=4)
    close(run)
    assert main(flags(train_dir, tmp_path / "split", *common, "--resume")) == 0
    whole = [(r["step"], r["loss"], r["lr"]) for r in metrics(tmp_path / "whole") if "loss" in r]
    split = [(r["step"], r["loss"], r["lr"]) for r in metrics(tmp_path / "split") if "loss" in r]
    assert [s for s, _, _ in whole] == [3, 6, 8]
    assert split == whole
    assert "note: resuming" not in capsys.readouterr().err   # same schedule: nothing to say
    # a larger --max-steps re-stretches the schedule: said in one line, and the new schedule applies
    assert main(flags(train_dir, tmp_path / "split", "--max-steps", "10", "--log-every", "3", "--resume")) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: resuming")]
    assert len(notes) == 1 and "total steps 8 -> 10" in notes[0], notes
    assert [r["step"] for r in metrics(tmp_path / "split") if "loss" in r][-2:] == [9, 10]


def test_config_mistakes_end_in_one_line_naming_the_flag(sotu_split, tmp_path):
    from maskstream.errors import UserError
    train_dir, _ = sotu_split
    with pytest.raises(UserError, match=r"--max-steps .* --epochs"):
        parse_args(["--data", str(train_dir), "--out", str(tmp_path)])
    with pytest.raises(UserError, match=r"argument --lr: invalid float value: 'fast'; see `maskstream train --help`"):
        parse_args(["--data", str(train_dir), "--out", str(tmp_path), "--max-steps", "1", "--lr", "fast"])
def test_train_takes_a_mixture_file_as_data(sotu_split, tmp_path):
    train_dir, held_out = sotu_split
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"sources": [{"path": str(train_dir), "weight": 0.75, "name": "train"},
                                           {"path": str(held_out), "weight": 0.25, "name": "held"}]}))
    out = tmp_path / "run"
    assert main(flags(mix, out, "--max-steps", "3")) == 0
    assert len([r for r in metrics(out) if "loss" in r]) == 3
    assert (out / "tokenizer.json").is_file(), "copied from the first source"
    ckpt = checkpoint.load(checkpoint.latest(out))
    assert ckpt["loader"]["sequences_consumed"] == 24 and ckpt["loader"]["partitions"] == 1


@pytest.mark.slow
def test_a_two_process_run_resumes_on_one_process_with_the_same_global_batch(sotu_split, tmp_path, capsys):
    train_dir, _ = sotu_split
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = ("--max-steps", "4", "--save-every", "2", "--loader-partitions", "2", "--device", "cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "trainer", *flags(train_dir, out, *common, "--batch-size", "4")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint.latest(out).unlink()  # as if the 2-process job had stopped after step 2
    with pytest.raises(UserError, match="--resume from .*ckpt-0000002.pt: loader state does not fit: the global "
                                        "batch is world_size x batch_size = 2 x 4 = 8 in the checkpoint but 1 x 4"):
        main(flags(train_dir, out, *common, "--batch-size", "4", "--resume"))
    assert main(flags(train_dir, out, *common, "--batch-size", "8", "--resume")) == 0
    assert "resuming a 2-process checkpoint on 1 processes" in capsys.readouterr().err
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]
    ckpt = checkpoint.load(checkpoint.latest(out))
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 1
    assert ckpt["loader"]["sequences_consumed"] == 4 * 8 and ckpt["loader"]["partitions"] == 2
