"""The streaming MLM loader: shards -> equal per-rank batches -> masked on the training device, resumable exactly.

    loader = MLMLoader("shards/", LoaderConfig(batch_size=32, num_workers=2), rank=r, world_size=w, device="cuda")
    for batch in loader:          # the rest of the current epoch; then loader.epoch += 1
        ...                       # batch: input_ids, labels (-100 where not masked), attention_mask, uids,
                              # document_ids, position_ids [, cu_seqlens, max_seqlen] (loader/stages.py)
    ckpt["loader"] = loader.state_dict();  loader.load_state_dict(ckpt["loader"])

The batches of a rank are a pure function of (dataset, seed, epoch, rank, world size, batch size) — not of the
worker count — and the masks a pure function of (seed, epoch, uid): see loader/order.py and loader/masking.py.
Each batch moves (pinned, when CUDA) to the device and is masked there; mask_on="worker" masks in the CPU
workers instead; static datasets use their stored copy epoch % K. Resuming seeks to the record that holds the
next sequence: nothing before it is read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from maskstream.errors import UserError
from maskstream.loader import masking as masking_rule
from maskstream.loader.order import REMAINDERS, RecordTable, batches_per_rank, remainder_counts
from maskstream.loader.stages import EpochStream, finish, load_index, static_copies, to_device
from maskstream.loader.storage import IOConfig, SourceError, open_source

STATE_VERSION = 1
MASK_ON = ("device", "worker")


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """How batches are cut, ordered and masked; recorded whole in checkpoints."""
    batch_size: int = 32
    seed: int = 0              # keys the order and the dynamic masks
    num_workers: int = 0       # DataLoader worker processes; the batches do not depend on it
    remainder: str = "drop"    # drop | wrap: what happens to the N % (world * batch) sequences left over
    mask_on: str = "device"    # device: mask where training runs | worker: mask in the CPU workers
    pin_memory: bool = True    # used when the device is CUDA
    timeout_s: float = 30.0    # remote reads: connect/read timeout ...
    retries: int = 3           # ... and retries after a dropped connection, a timeout or a 5xx
    check_records: bool = True  # compare each record's checksum with index.json before decoding it (format v2)
    documents: bool = True     # batches carry document_ids and position_ids (False: the v1 loader's batches)
    varlen: bool = False       # also cu_seqlens and max_seqlen, for varlen attention kernels

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0 (0 reads in the training process)")
        if self.remainder not in REMAINDERS:
            raise ValueError(f"remainder={self.remainder!r}; choose one of {REMAINDERS}")
        if self.mask_on not in MASK_ON:
            raise ValueError(f"mask_on={self.mask_on!r}; choose one of {MASK_ON}")
        IOConfig(timeout_s=self.timeout_s, retries=self.retries)
        if self.varlen and not self.documents:
            raise ValueError("varlen=True needs documents=True: cu_seqlens come from the document ids")


class MLMLoader:
    """Iterate masked MLM batches of one rank over a shard folder or URL prefix (see the module docstring)."""

    def __init__(self, root: str, config: LoaderConfig, *, masking: masking_rule.MaskingConfig | None = None,
                 rank: int = 0, world_size: int = 1, device="cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.root, self.config, self.rank, self.world_size = str(root), config, rank, world_size
        self.device = torch.device(device)
        self.source = open_source(self.root, IOConfig(timeout_s=config.timeout_s, retries=config.retries))
        self.index, self.fingerprint = load_index(self.source)
        self.table = RecordTable.from_index(self.index)
        self.vocab = masking_rule.Vocab.from_index(self.index)
        self.seq_len = int(self.index["seq_len"])
        self.static_copies = static_copies(self.index)
        stored = masking_rule.MaskingConfig.from_dict(self.index["masking"]["config"])
        if self.static_copies and masking is not None and masking != stored:
            raise UserError(f"{self.root} stores static masks made with {stored}; a different masking config "
                             f"cannot apply to them. Pass masking=None, or preprocess with --masking dynamic")
        self.masking = stored if masking is None else masking
        if self.masking.selection == "pmi" and "units" not in self.index:
            raise UserError(f"{self.root} has no PMI masking units, which selection 'pmi' needs; preprocess it "
                            f"with `maskstream preprocess ... --selection pmi`, or choose another selection")
        self.batches_per_epoch = batches_per_rank(self.table.num_sequences, batch_size=config.batch_size,
                                                  world_size=world_size, remainder=config.remainder,
                                                  source=self.root)
        self.epoch, self.sequences_consumed = 0, 0
        self.stats: dict[int, dict] = {}  # epoch -> sequences, batches per rank, dropped, wrapped

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch at the next iter()."""
        self.epoch, self.sequences_consumed = int(epoch), 0

    def __iter__(self):
        """The rest of the current epoch's batches, on the device; the epoch advances with its last batch."""
        cfg, epoch = self.config, self.epoch
        start = self.sequences_consumed // cfg.batch_size
        stream = EpochStream(source=self.source, index=self.index, table=self.table, config=cfg, rank=self.rank,
                             world_size=self.world_size, masking_config=self.masking, vocab=self.vocab,
                             epoch=epoch, start_batch=start)
        n = self.table.num_sequences
        dropped, wrapped = remainder_counts(n, self.batches_per_epoch, batch_size=cfg.batch_size,
                                            world_size=self.world_size)
        self.stats[epoch] = {"sequences": n, "batches_per_rank": self.batches_per_epoch,
                             "dropped": dropped, "wrapped": wrapped}
        pin = cfg.pin_memory and self.device.type == "cuda"
        # NOTE: a DataLoader draws a base seed for every iterator, from the global RNG unless given a
        # generator; ours is private, so iterating never moves the training process's RNG (dropout, init).
        private = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        batches = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                                              pin_memory=pin, generator=private)
        for raw in batches:
            if "attention_mask" in raw:  # masked in the worker already
                out = {k: to_device(v, self.device) for k, v in raw.items()}
            else:
                out = finish(raw, seed=cfg.seed, epoch=epoch, config=self.masking, vocab=self.vocab,
                             seq_len=self.seq_len, device=self.device)
            self.sequences_consumed += cfg.batch_size
            if self.sequences_consumed >= self.batches_per_epoch * cfg.batch_size:
                self.epoch, self.sequences_consumed = epoch + 1, 0
            yield out

    def state_dict(self) -> dict:
        """A small flat dict: where this rank is, and what must match to resume."""
        c = self.config
        return {"format_version": STATE_VERSION, "epoch": self.epoch, "sequences_consumed": self.sequences_consumed,
                "seed": c.seed, "world_size": self.world_size, "num_workers": c.num_workers,
                "batch_size": c.batch_size, "remainder": c.remainder, "dataset": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict(); refuse a state from another dataset, world size, batch size, seed or remainder.

        A different num_workers is fine: the batches do not depend on it.
        """
        if state.get("format_version") != STATE_VERSION:
            raise ValueError(f"loader state format_version={state.get('format_version')!r}; this loader reads "
                             f"version {STATE_VERSION}")
        mine = self.state_dict()
        for key, fix in (("dataset", "resume on the dataset the checkpoint was trained on (index.json differs)"),
                         ("world_size", "relaunch with the same number of processes"),
                         ("batch_size", "use the checkpoint's batch size"),
                         ("seed", "use the checkpoint's seed"),
                         ("remainder", "use the checkpoint's remainder mode")):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state does not fit: {key}={state.get(key)!r} in the checkpoint but "
                                 f"{mine[key]!r} here; {fix}")
        consumed = int(state["sequences_consumed"])
        if consumed % self.config.batch_size or not 0 <= consumed <= self.batches_per_epoch * self.config.batch_size:
            raise ValueError(f"loader state sequences_consumed={consumed} is not a whole number of batches of "
                             f"{self.config.batch_size} within the epoch's {self.batches_per_epoch} batches")
        self.epoch, self.sequences_consumed = int(state["epoch"]), consumed


__all__ = ["LoaderConfig", "MLMLoader", "SourceError", "MASK_ON", "STATE_VERSION"]
