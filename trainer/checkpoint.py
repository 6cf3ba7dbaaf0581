"""Checkpoints that resume exactly and load safely: RUN/ckpt-<step>.pt plus its checksum, RUN/ckpt-<step>.json.

The Checkpointer is handed what it saves, as torchtitan's is: a dict of stateful parts (anything with
state_dict/load_state_dict — model, optimizer, scheduler, loader — or a plain dict of counters) and a
JSON-able config. It knows nothing of the training loop. It adds every rank's RNG state itself.

Guarantees:
- written atomically (temporary + rename); the sidecar JSON with the sha256 is written after the checkpoint,
  so a checkpoint without a matching sidecar is a killed or damaged write and is never resumed from;
- loaded with torch.load(weights_only=True) after the checksum matches: a crafted file runs no code;
- a state holding a NaN or an infinity is refused, never written;
- rotation keeps the newest `keep` checkpoints and never deletes the one just written.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from maskstream.loader.atomic import atomic_write, atomic_write_with

CHECKPOINT_VERSION = 2  # 2: sidecar checksum, weights_only load, parts + counters
_CKPT = re.compile(r"^ckpt-(\d{7,})\.pt$")


class CorruptCheckpoint(ValueError):
    """A checkpoint whose bytes do not match its recorded checksum (or that has none)."""


def checkpoints(out: Path) -> list[Path]:
    """The run's checkpoint files, oldest first (intact or not)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(out: Path) -> Path | None:
    """The newest checkpoint file, intact or not (see load_latest for the newest intact one)."""
    found = checkpoints(out)
    return found[-1] if found else None


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path) -> None:
    """Raise CorruptCheckpoint unless path's size and sha256 match its sidecar."""
    path = Path(path)
    try:
        record = json.loads(sidecar(path).read_text())
        want_sha, want_bytes = record["sha256"], record["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CorruptCheckpoint(f"{path.name} has no readable checksum {sidecar(path).name} "
                                "(its write was interrupted)") from None
    size = path.stat().st_size
    if size != want_bytes:
        raise CorruptCheckpoint(f"{path.name} is {size} bytes, its checksum file says {want_bytes} (truncated)")
    if sha256_file(path) != want_sha:
        raise CorruptCheckpoint(f"{path.name} does not match its sha256 (the file is damaged)")


def load(path: Path, map_location="cpu") -> dict:
    """A verified checkpoint's contents; tensors and plain containers only, so loading runs no code."""
    verify(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refusing to unpickle anything but tensors and plain containers "
                         f"({str(e).splitlines()[0]}); this file was not written by maskstream") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        version = ckpt.get("version") if isinstance(ckpt, dict) else None
        raise ValueError(f"{path}: checkpoint version {version!r}, this trainer reads "
                         f"{CHECKPOINT_VERSION}; resume with the maskstream version that wrote it")
    return ckpt


def load_latest(out: Path, map_location="cpu") -> tuple[Path, dict] | None:
    """(path, contents) of the newest intact checkpoint, saying in one line which damaged ones it passed over."""
    for path in reversed(checkpoints(out)):
        try:
            return path, load(path, map_location)
        except CorruptCheckpoint as e:
            print(f"warning: skipping {e}; trying the previous checkpoint", file=sys.stderr)
    return None


def _nonfinite(state, where: str = "") -> str | None:
    """The name of the first floating tensor in a nested state holding a NaN or an infinity, else None."""
    if isinstance(state, torch.Tensor):
        return where if state.is_floating_point() and not bool(torch.isfinite(state).all()) else None
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        if (bad := _nonfinite(value, f"{where}.{key}" if where else str(key))) is not None:
            return bad
    return None


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


def _state(part):
    return part.state_dict() if hasattr(part, "state_dict") else dict(part)


class Checkpointer:
    """Saves and restores `parts` (name -> stateful object or counters dict) in `out`; rank 0 writes."""

    def __init__(self, out: Path, parts: dict, *, keep: int, rank: int = 0, world: int = 1,
                 device: torch.device | None = None):
        if keep < 1:
            raise ValueError(f"keep={keep} checkpoints; keep at least 1")
        reserved = {"version", "step", "rng", "config"} & set(parts)
        if reserved:
            raise ValueError(f"part names {sorted(reserved)} are reserved; rename them")
        self.out, self.parts, self.keep = Path(out), parts, keep
        self.rank, self.world, self.device = rank, world, device or torch.device("cpu")

    def save(self, step: int, config: dict) -> Path | None:
        """Write ckpt-<step>.pt and its checksum (rank 0); returns the path on rank 0."""
        rngs = _gather(_rng_state(self.device), self.world)  # every rank's dropout stream
        if self.rank != 0:
            return None
        ckpt = {"version": CHECKPOINT_VERSION, "step": int(step), "rng": rngs, "config": config,
                **{name: _state(part) for name, part in self.parts.items()}}
        if (bad := _nonfinite(ckpt)) is not None:
            raise ValueError(f"refusing to checkpoint step {step}: {bad} holds a NaN or an infinity")
        path = self.out / f"ckpt-{step:07d}.pt"
        sidecar(path).unlink(missing_ok=True)  # a rewrite of this step: stale checksum first, never a mismatch
        atomic_write_with(path, lambda f: torch.save(ckpt, f))
        record = {"checkpoint": path.name, "step": int(step), "bytes": path.stat().st_size,
                  "sha256": sha256_file(path)}  # hashed as read back: what is on disk
        atomic_write(sidecar(path), (json.dumps(record) + "\n").encode())
        for old in checkpoints(self.out)[:-self.keep]:
            if old != path:  # the checkpoint just written is the newest intact one: never rotated away
                sidecar(old).unlink(missing_ok=True)
                old.unlink()
        return path

    def load_latest(self) -> tuple[Path, dict] | None:
        """(path, contents) of the newest intact checkpoint, on this rank's device; None if there is none."""
        return load_latest(self.out, map_location=self.device)

    def restore(self, ckpt: dict, path: Path | None = None, *, reseed: int | None = None) -> None:
        """Load every part and this rank's RNG state from a checkpoint's contents.

        A checkpoint of another world size loads only with `reseed` (the parts decide whether they fit: the
        loader's state checks its global batch), and this rank's RNG is then seeded with it.
        """
        where = f"{path}" if path else "the checkpoint"
        moved = len(ckpt["rng"]) != self.world
        if moved and reseed is None:
            raise ValueError(f"{where} was written by {len(ckpt['rng'])} ranks, this run has {self.world}; "
                             "resume with the same number of processes")
        missing = set(self.parts) - set(ckpt)
        if missing:
            raise ValueError(f"{where} holds no {sorted(missing)}; resume with the maskstream version that wrote it")
        for name, part in self.parts.items():
            if hasattr(part, "load_state_dict"):
                part.load_state_dict(ckpt[name])
            else:
                part.update(ckpt[name])
        if moved:
            torch.manual_seed(reseed)
            return
        rng = ckpt["rng"][self.rank]
        torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
