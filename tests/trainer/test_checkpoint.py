"""Checkpointer on tiny parts: checksums catch damage, resume passes over it, loading runs no code, no NaN is saved."""
import json
import math
from pathlib import Path

import pytest
import torch

from maskstream.trainer import checkpoint, run_folder
from maskstream.trainer.checkpoint import Checkpointer, CorruptCheckpoint


def parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer, "counters": {"step": 0, "skipped_steps": 0}}


def saved_run(out: Path, steps=(1, 2, 3), keep=3) -> tuple[Checkpointer, dict]:
    p = parts()
    ckpt = Checkpointer(out, p, keep=keep)
    for step in steps:
        p["counters"]["step"] = step
        with torch.no_grad():
            p["model"].weight.add_(1.0)
        ckpt.save(step, {"note": f"step {step}"})
    return ckpt, p


def flip_byte(path: Path, at: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_save_writes_a_sha256_sidecar_and_restore_is_exact(tmp_path):
    _, p = saved_run(tmp_path)
    path = checkpoint.latest(tmp_path)
    record = json.loads(checkpoint.sidecar(path).read_text())
    assert record["checkpoint"] == "ckpt-0000003.pt" and record["sha256"] == checkpoint.sha256_file(path)
    fresh = parts()
    found, state = Checkpointer(tmp_path, fresh, keep=3).load_latest()
    Checkpointer(tmp_path, fresh, keep=3).restore(state, found)
    assert found == path and state["config"] == {"note": "step 3"} and fresh["counters"]["step"] == 3
    assert torch.equal(fresh["model"].weight, p["model"].weight)
    exp_avg = p["optimizer"].state_dict()["state"][0]["exp_avg"]
    assert fresh["optimizer"].state_dict()["state"][0]["exp_avg"].equal(exp_avg)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "no checksum"])
def test_a_damaged_latest_checkpoint_is_skipped_in_one_line_for_the_newest_intact_one(tmp_path, capsys, damage):
    saved_run(tmp_path)
    path = checkpoint.latest(tmp_path)
    if damage == "flipped byte":
        flip_byte(path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # killed between the checkpoint and its sidecar
        checkpoint.sidecar(path).unlink()
    with pytest.raises(CorruptCheckpoint):
        checkpoint.load(path)
    found, state = checkpoint.load_latest(tmp_path)
    assert found.name == "ckpt-0000002.pt" and state["step"] == 2
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "skipping ckpt-0000003.pt" in warning[0]


def test_every_checkpoint_damaged_means_none_to_resume_from(tmp_path):
    saved_run(tmp_path, steps=(1, 2))
    for path in checkpoint.checkpoints(tmp_path):
        flip_byte(path)
    assert checkpoint.load_latest(tmp_path) is None


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_crafted_pickle_runs_no_code_even_with_a_valid_checksum(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt-0000009.pt"
    torch.save({"version": checkpoint.CHECKPOINT_VERSION, "model": Payload(marker)}, path)
    checkpoint.sidecar(path).write_text(json.dumps({"bytes": path.stat().st_size,
                                                    "sha256": checkpoint.sha256_file(path)}))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        checkpoint.load(path)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        checkpoint.load_latest(tmp_path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.exists()


def test_a_state_holding_nan_is_refused_and_nothing_is_written(tmp_path):
    p = parts()
    with torch.no_grad():
        p["model"].bias[1] = math.nan
    with pytest.raises(ValueError, match=r"refusing to checkpoint step 5: model\.bias holds a NaN"):
        Checkpointer(tmp_path, p, keep=2).save(5, {})
    assert list(tmp_path.iterdir()) == []


def test_rotation_keeps_the_newest_and_never_the_just_written_one_away(tmp_path):
    saved_run(tmp_path, steps=(1, 2, 3, 4), keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-0000003.pt", "ckpt-0000004.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["ckpt-0000003.json", "ckpt-0000004.json"]
    # a damaged later checkpoint (say step 9, from before a resume at step 4) must not push out step 5
    (tmp_path / "ckpt-0000009.pt").write_bytes(b"damaged")
    saved_run(tmp_path, steps=(5,), keep=1)
    found, state = checkpoint.load_latest(tmp_path)
    assert found.name == "ckpt-0000005.pt" and state["step"] == 5


def test_remove_leftovers_deletes_only_temporaries_of_killed_writes(tmp_path):
    saved_run(tmp_path, steps=(1,))
    (tmp_path / ".ckpt-0000002.pt.tmp4242").write_bytes(b"half")
    (tmp_path / ".config.json.tmp7").write_text("{")
    removed = run_folder.remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".ckpt-0000002.pt.tmp4242", ".config.json.tmp7"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000001.json", "ckpt-0000001.pt"]
