"""The run folder's plain files: config.json, the tokenizer copy, metrics.jsonl, loss.png.

Each is written atomically through loader.atomic.

RUN/
  config.json           train + model config, vocabulary, the dataset's index summary (written at start)
  tokenizer.json        copy of the dataset's tokenizer, so fill-mask can tokenize text
  metrics.jsonl         one JSON line per logged step, and one per evaluation (keys eval_*)
  loss.png              training and held-out loss against step
  ckpt-*.pt, ckpt-*.json  checkpoints and their checksums (maskstream.trainer.checkpoint)

Every file here is written under a temporary name (.NAME.tmpPID) and renamed, so a killed process leaves
either the old file or the new one, plus at worst a temporary that remove_leftovers() deletes at start.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from maskstream.loader.atomic import atomic_write

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
_TEMP = ".tmp"  # a temporary is named .NAME.tmpPID


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the temporaries of writes that were killed before their rename; returns what was removed."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.name.startswith(".") and _TEMP in p.name and p.is_file()]
    for p in found:
        p.unlink()
    return found


def write_config(out: Path, config: dict) -> None:
    """RUN/config.json: the run's whole configuration, as JSON."""
    atomic_write(Path(out) / CONFIG, json.dumps(config, indent=2).encode())


def copy_tokenizer(out: Path, *, data: str, index: dict, given: str | None = None) -> None:
    """RUN/tokenizer.json from --tokenizer, else from the dataset folder; refuses one the dataset was not made
    with (its sha256 is in index.json)."""
    src = Path(given) if given else tokenizer_source(data, index)
    if src is None:
        print(f"note: {data} has no tokenizer.json; pass --tokenizer FILE so fill-mask can use this run",
              file=sys.stderr)
        return
    content = src.read_bytes()
    want = (index.get("tokenizer") or {}).get("sha256", "")
    if len(want) == 64 and hashlib.sha256(content).hexdigest() != want:
        raise ValueError(f"{src} is not the tokenizer {data} was made with (sha256 differs from "
                         "index.json); pass the tokenizer.json given to `maskstream preprocess`")
    atomic_write(Path(out) / TOKENIZER, content)


def tokenizer_source(data: str, index: dict) -> Path | None:
    """DIR/tokenizer.json (the Beam job writes it beside the shards), else the local file index.json names."""
    local = Path(data) / TOKENIZER
    if local.is_file():
        return local
    recorded = ((index.get("config") or {}).get("tokenize") or {}).get("tokenizer")
    return Path(recorded) if isinstance(recorded, str) and Path(recorded).is_file() else None


def append_metrics(out: Path, record: dict) -> None:
    with open(Path(out) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(out: Path, step: int) -> None:
    """Drop metric lines after `step` (a resumed run rewrites them), or the whole file for a fresh run."""
    path = Path(out) / METRICS
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write(path, "".join(line + "\n" for line in keep).encode())


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot(out: Path) -> Path | None:
    """RUN/loss.png: training loss and held-out loss against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=False), label="train MLM loss", lw=1)
    if held:
        ax.plot(*zip(*held, strict=False), "o-", label="held-out MLM loss (fixed mask)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(Path(out).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out) / PLOT
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
