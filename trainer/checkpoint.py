"""A run folder on disk: config.json, atomic checkpoints that resume exactly, metrics.jsonl and the loss plot.

RUN/
  config.json           train + model config, vocabulary, the dataset's index summary (written at start)
  tokenizer.json        copy of the dataset's tokenizer, so fill-mask can tokenize text
  metrics.jsonl         one JSON line per logged step, and one per evaluation (keys eval_*)
  loss.png              training and held-out loss against step
  ckpt-0000100.pt       model, optimizer, schedule, loader state, every rank's RNG state, full config
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from maskstream.loader.atomic import atomic_write, atomic_write_with

if TYPE_CHECKING:
    from maskstream.trainer.train import Run

CHECKPOINT_VERSION = 1
_CKPT = re.compile(r"^ckpt-(\d{7,})\.pt$")


def checkpoints(out: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(out: Path) -> Path | None:
    found = checkpoints(Path(out))
    return found[-1] if found else None


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary name in the same folder, then rename: a crash never leaves half a file."""
    atomic_write_with(path, lambda f: torch.save(obj, f))


def save(run: "Run") -> Path | None:
    """Write RUN/ckpt-<step>.pt (rank 0) holding everything needed to continue bit for bit."""
    rngs = _gather(_rng_state(run.device), run.world)  # every rank's dropout stream
    if run.rank != 0:
        return None
    out = Path(run.cfg.out)
    path = out / f"ckpt-{run.step:07d}.pt"
    atomic_save({
        "version": CHECKPOINT_VERSION,
        "step": run.step,
        "model": run.raw_model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "loader": run.loader.state_dict(),
        "rng": rngs,
        "config": run_config(run),
    }, path)
    for old in checkpoints(out)[:-run.cfg.keep_checkpoints]:
        old.unlink()
    return path


def load(path: Path, map_location="cpu") -> dict:
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')!r}, this trainer reads "
                         f"{CHECKPOINT_VERSION}; resume with the maskstream version that wrote it")
    return ckpt


def resume(run: "Run") -> int:
    """Restore run from its latest checkpoint; returns the step to continue from (0 if none)."""
    path = latest(Path(run.cfg.out))
    if path is None:
        return 0
    ckpt = load(path, map_location=run.device)
    saved = ckpt["config"]
    if saved["model"] != run.raw_model.config.to_dict():
        raise ValueError(f"{path} holds a {saved['train']['model_size']} model with a different shape than "
                         f"--model-size {run.cfg.model_size}; resume with the run's own flags")
    if len(ckpt["rng"]) != run.world:
        raise ValueError(f"{path} was written by {len(ckpt['rng'])} ranks, this run has {run.world}; "
                         "resume with the same number of processes")
    run.raw_model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.loader.load_state_dict(ckpt["loader"])
    rng = ckpt["rng"][run.rank]
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), run.device)
    return int(ckpt["step"])


def run_config(run: "Run") -> dict:
    index = run.loader.index
    return {"train": run.cfg.to_dict(), "model": run.raw_model.config.to_dict(), "vocab": run.loader.vocab.to_dict(),
            "world_size": run.world, "total_steps": run.total_steps,
            "dataset": {k: index.get(k) for k in ("seq_len", "packing", "tokenizer", "masking", "counts")}}


def write_run_config(run: "Run") -> None:
    """RUN/config.json and RUN/tokenizer.json (copied from the dataset folder when it has one)."""
    out = Path(run.cfg.out)
    atomic_write(out / "config.json", json.dumps(run_config(run), indent=2))
    src = Path(run.cfg.tokenizer) if run.cfg.tokenizer else tokenizer_source(run.cfg.data, run.loader.index)
    if src is None:
        print(f"note: {run.cfg.data} has no tokenizer.json; pass --tokenizer FILE so fill-mask can use this run",
              file=sys.stderr)
        return
    data = src.read_bytes()
    want = (run.loader.index.get("tokenizer") or {}).get("sha256", "")
    if len(want) == 64 and hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"{src} is not the tokenizer {run.cfg.data} was made with (sha256 differs from "
                         "index.json); pass the tokenizer.json given to `maskstream preprocess`")
    (out / "tokenizer.json").write_bytes(data)


def tokenizer_source(data: str, index: dict) -> Path | None:
    """DIR/tokenizer.json (the Beam job writes it beside the shards), else the local file index.json names."""
    local = Path(data) / "tokenizer.json"
    if local.is_file():
        return local
    recorded = ((index.get("config") or {}).get("tokenize") or {}).get("tokenizer")
    return Path(recorded) if isinstance(recorded, str) and Path(recorded).is_file() else None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after `step` (a resumed run rewrites them), or the whole file for a fresh run."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write(path, "".join(line + "\n" for line in keep))


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot(out: Path) -> Path | None:
    """RUN/loss.png: training loss and held-out loss against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train MLM loss", lw=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out MLM loss (fixed mask)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(Path(out).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out) / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
