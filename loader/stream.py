"""The streaming MLM loader: shards -> equal per-rank batches -> masked on the training device, resumable exactly.

    loader = MLMLoader("shards/", LoaderConfig(batch_size=32, num_workers=2), rank=r, world_size=w, device="cuda")
    for batch in loader:          # the rest of the current epoch; then loader.epoch += 1
        ...                       # batch: input_ids, labels (-100 where not masked), attention_mask, uids,
                              # document_ids, position_ids [, cu_seqlens, max_seqlen] (loader/stages.py)
    ckpt["loader"] = loader.state_dict();  loader.load_state_dict(ckpt["loader"])

`data` is a dataset (folder or URL prefix), a mixture file (`mix.json`) or a loader.mixture.Mixture. The global
batches are a pure function of (data, seed, epoch, world size x batch size, partitions) — not of the worker
count, nor of how the global batch is split over ranks — and the masks a pure function of (seed, epoch or
pass, uid): see loader/order.py, loader/mixture.py and loader/masking.py. A state saved on W ranks of batch B
resumes on W' ranks of B' when W*B = W'*B' and W' divides the partitions. Each batch moves (pinned, when CUDA)
to the device and is masked there; mask_on="worker" masks in the CPU workers instead; static datasets use
their stored copy epoch % K. Resuming seeks to the record that holds the next sequence: nothing before it is
read. Remote datasets can be cached on local disk (cache_dir; loader/cache.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from maskstream.errors import UserError
from maskstream.loader import cache as record_cache
from maskstream.loader import masking as masking_rule
from maskstream.loader import mixture as mix
from maskstream.loader.order import (
    LAYOUTS,
    REMAINDERS,
    RecordTable,
    batches_per_rank,
    check_partitions,
    plan_epoch,
    remainder_counts,
)
from maskstream.loader.stages import Dataset, EpochStream, finish_rows, load_index, static_copies, to_device
from maskstream.loader.storage import IOConfig, SourceError, open_source

# 2 added partitions (elastic resume); a version-1 state had partitions = its world size. 3 cuts partitions on
# record boundaries (layout "records"); older states resume with the contiguous cut they were saved with, and
# a mixture's state carries its cursors, so that resuming does not replay the steps before it.
STATE_VERSION = 3
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
    partitions: int = 0        # canonical partitions of the stream (0: the world size); elastic resume on any
                               # world size that divides it (loader/order.py)
    cache_dir: str | None = None          # remote datasets: keep fetched records here (loader/cache.py)
    cache_limit_bytes: int | None = None  # ... evicting the least recently used past this (None: no limit)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0 (0 reads in the training process)")
        if self.remainder not in REMAINDERS:
            raise ValueError(f"remainder={self.remainder!r}; choose one of {REMAINDERS}")
        if self.mask_on not in MASK_ON:
            raise ValueError(f"mask_on={self.mask_on!r}; choose one of {MASK_ON}")
        if self.partitions < 0:
            raise ValueError(f"partitions={self.partitions} must be >= 0 (0: as many as ranks)")
        if self.cache_limit_bytes is not None and (self.cache_dir is None or self.cache_limit_bytes < 1):
            raise ValueError(f"cache_limit_bytes={self.cache_limit_bytes} needs a cache_dir and must be >= 1")
        IOConfig(timeout_s=self.timeout_s, retries=self.retries)
        if self.varlen and not self.documents:
            raise ValueError("varlen=True needs documents=True: cu_seqlens come from the document ids")


def open_dataset(root: str, config: LoaderConfig) -> Dataset:
    """A dataset's source (read through the local cache when remote and cache_dir is set), index and records."""
    source = open_source(str(root), IOConfig(timeout_s=config.timeout_s, retries=config.retries))
    index, fingerprint = load_index(source)
    table = RecordTable.from_index(index)
    if config.cache_dir is not None and record_cache.is_remote(source):
        largest = int((table.end - table.offset).max()) + record_cache.TRAILER
        if config.cache_limit_bytes is not None and config.cache_limit_bytes < largest:
            raise UserError(f"cache_limit_bytes={config.cache_limit_bytes:,} is below one record of {root} "
                            f"({largest:,} bytes); raise it, or pass cache_limit_bytes=None for no limit")
        source = record_cache.RecordCache(source, cache_dir=config.cache_dir, index=index, table=table,
                                          fingerprint=fingerprint, limit_bytes=config.cache_limit_bytes)
    return Dataset(str(root), source, index, fingerprint, table)


class MLMLoader:
    """Iterate masked MLM batches of one rank over a dataset or a mixture of datasets (see the module docstring)."""

    def __init__(self, data, config: LoaderConfig, *, masking: masking_rule.MaskingConfig | None = None,
                 rank: int = 0, world_size: int = 1, device="cpu"):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device = torch.device(device)
        self.mixture = mix.resolve(data)
        self.root = self.mixture.name if self.mixture else str(data)
        roots = [s.path for s in self.mixture.sources] if self.mixture else [self.root]
        self.datasets = tuple(open_dataset(r, config) for r in roots)
        self.source_names = [s.label for s in self.mixture.sources] if self.mixture else [self.root]
        first = self.datasets[0]
        self.index, self.table, self.fingerprint = first.index, first.table, first.fingerprint
        self.vocab = masking_rule.Vocab.from_index(self.index)
        self.seq_len = int(self.index["seq_len"])
        self.static_copies = static_copies(self.index)
        stored = masking_rule.MaskingConfig.from_dict(self.index["masking"]["config"])
        if self.static_copies and masking is not None and masking != stored:
            raise UserError(f"{self.root} stores static masks made with {stored}; a different masking config "
                             f"cannot apply to them. Pass masking=None, or preprocess with --masking dynamic")
        self.masking = stored if masking is None else masking
        lacking = [d.root for d in self.datasets if "units" not in d.index]
        if self.masking.selection == "pmi" and lacking:
            raise UserError(f"{lacking[0]} has no PMI masking units, which selection 'pmi' needs; preprocess it "
                            f"with `maskstream preprocess ... --selection pmi`, or choose another selection")
        self.partitions = check_partitions(config.partitions, world_size=world_size, batch_size=config.batch_size)
        self.layout = "records"  # a state of version < 3 sets "contiguous" (order.cut_partitions)
        self._plan_stream()
        self.epoch, self.sequences_consumed = 0, 0
        self.mask_rate: float | None = None  # set_mask_rate: a schedule's rate for the next batches
        self.stats: dict[int, dict] = {}  # epoch -> sequences, batches per rank, dropped, wrapped [, sources]

    def _plan_stream(self) -> None:
        """batches_per_epoch, and for a mixture its plan (which depends on the global batch and partitions)."""
        cfg, self.mix_plan = self.config, None
        if self.mixture is None:
            self.batches_per_epoch = batches_per_rank(self.table.num_sequences, batch_size=cfg.batch_size,
                                                      world_size=self.world_size, remainder=cfg.remainder,
                                                      source=self.root)
            return
        mix.check_compatible(self.mixture, self.datasets)
        share = mix.shares(self.mixture, self.datasets)
        size = mix.epoch_sequences(self.mixture, self.datasets, share)
        for s, ds in zip(self.mixture.sources, self.datasets, strict=True):
            if ds.table.num_sequences < self.partitions:
                raise UserError(f"mixture source {s.label} ({s.path}) holds {ds.table.num_sequences} sequences, "
                                f"fewer than the {self.partitions} partitions; use fewer partitions or add data")
        steps = batches_per_rank(size, batch_size=cfg.batch_size, world_size=self.world_size,
                                 remainder=cfg.remainder, source=f"an epoch of {self.root}")
        self.fingerprint = mix.fingerprint(self.mixture, self.datasets, share, size)
        self.mix_plan = mix.MixPlan(tuple(ds.table for ds in self.datasets), tuple(share),
                                    cfg.batch_size * self.world_size, self.partitions, cfg.seed, steps,
                                    self.layout)
        self.batches_per_epoch = steps

    @property
    def source(self):
        """The (first) dataset's source; assigning one wraps or replaces how that dataset is read."""
        return self.datasets[0].source

    @source.setter
    def source(self, value) -> None:
        self.datasets = (dataclasses.replace(self.datasets[0], source=value),) + self.datasets[1:]

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch at the next iter()."""
        self.epoch, self.sequences_consumed = int(epoch), 0

    def set_mask_rate(self, rate: float | None) -> None:
        """Mask the batches handed out from now on at `rate` (None: the masking config's mask_prob).

        The rate is read when a batch is masked on the device, so a trainer sets it before taking each batch.
        """
        if rate is not None and (self.static_copies or self.config.mask_on != "device"):
            what = "holds stored static masks" if self.static_copies else "masks in the workers (mask_on=worker)"
            raise UserError(f"a mask-rate schedule needs masks made on the device, but {self.root} {what}; "
                            "preprocess with --masking dynamic and keep mask_on=device, or drop --mask-schedule")
        self.mask_rate = None if rate is None else masking_rule.check_rate(rate)

    def _epoch_plan(self, epoch: int, start: int):
        cfg = self.config
        if self.mix_plan is not None:
            return self.mix_plan.epoch(epoch, self.world_size, start)
        return plan_epoch(self.table, seed=cfg.seed, epoch=epoch, batch_size=cfg.batch_size,
                          world_size=self.world_size, remainder=cfg.remainder, partitions=self.partitions,
                          layout=self.layout)

    def _epoch_stats(self, epoch: int) -> dict:
        cfg, nb = self.config, self.batches_per_epoch
        if self.mix_plan is None:
            n = self.table.num_sequences
            dropped, wrapped = remainder_counts(n, nb, batch_size=cfg.batch_size, world_size=self.world_size)
            return {"sequences": n, "batches_per_rank": nb, "dropped": dropped, "wrapped": wrapped}
        a, b = self.mix_plan.cursor(epoch * nb), self.mix_plan.cursor((epoch + 1) * nb)
        chunk = self.mix_plan.chunk
        return {"sequences": nb * cfg.batch_size * self.world_size, "batches_per_rank": nb, "dropped": 0,
                "wrapped": 0,  # a mixture's epoch is a number of steps: its sources run on across epochs
                "sources": {name: {"sequences": b.taken[i] - a.taken[i],
                                   "passes": [min(a.taken_by[i]) // chunk[i], max(b.taken_by[i]) // chunk[i]]}
                            for i, name in enumerate(self.source_names)}}

    def __iter__(self):
        """The rest of the current epoch's batches, on the device; the epoch advances with its last batch."""
        cfg, epoch = self.config, self.epoch
        start = self.sequences_consumed // cfg.batch_size
        plan = self._epoch_plan(epoch, start)
        if cfg.cache_limit_bytes is not None:
            record_cache.check_limit(cfg.cache_limit_bytes, self.datasets,
                                     self._epoch_plan(epoch, start).specs(self.rank, start), rank=self.rank)
        stream = EpochStream(datasets=self.datasets, plan=plan, config=cfg, rank=self.rank,
                             masking_config=self.masking, vocab=self.vocab, epoch=epoch, start_batch=start,
                             mixed=self.mix_plan is not None)
        self.stats[epoch] = self._epoch_stats(epoch)
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
                out = finish_rows(raw, seed=cfg.seed, epoch=epoch, config=self.masking, vocab=self.vocab,
                                  seq_len=self.seq_len, device=self.device, rate=self.mask_rate)
            self.sequences_consumed += cfg.batch_size
            if self.sequences_consumed >= self.batches_per_epoch * cfg.batch_size:
                self.epoch, self.sequences_consumed = epoch + 1, 0
            yield out

    def state_dict(self) -> dict:
        """A small dict: where this rank is, what must match to resume, and for a mixture its cursors."""
        c = self.config
        state = {"format_version": STATE_VERSION, "epoch": self.epoch,
                 "sequences_consumed": self.sequences_consumed, "seed": c.seed, "world_size": self.world_size,
                 "num_workers": c.num_workers, "batch_size": c.batch_size, "remainder": c.remainder,
                 "partitions": self.partitions, "layout": self.layout, "dataset": self.fingerprint}
        if self.mix_plan is not None:  # the cursors at the epoch's start and here (JSON-ready lists)
            first = self.epoch * self.batches_per_epoch
            state["mix_cursors"] = [self.mix_plan.cursor(s).to_list()
                                    for s in sorted({first, first + self.sequences_consumed // c.batch_size})]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict(), on any world size W' with W' x batch_size = the state's global batch.

        Refuses a state from another dataset (or mixture), seed, remainder mode or global batch, and one whose
        partitions this world size cannot share. A different num_workers is fine: the batches do not depend on it.
        """
        if state.get("format_version") not in range(1, STATE_VERSION + 1):
            raise ValueError(f"loader state format_version={state.get('format_version')!r}; this loader reads "
                             f"versions 1 to {STATE_VERSION}")
        mine = self.state_dict()
        for key, fix in (("dataset", "resume on the dataset or mixture the checkpoint was trained on "
                                     "(an index.json, a weight or the epoch size differs)"),
                         ("seed", "use the checkpoint's seed"),
                         ("remainder", "use the checkpoint's remainder mode")):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state does not fit: {key}={state.get(key)!r} in the checkpoint but "
                                 f"{mine[key]!r} here; {fix}")
        world, batch = int(state["world_size"]), int(state["batch_size"])
        here = self.world_size * self.config.batch_size
        if world * batch != here:
            raise ValueError(f"loader state does not fit: the global batch is world_size x batch_size = {world} x "
                             f"{batch} = {world * batch} in the checkpoint but {self.world_size} x "
                             f"{self.config.batch_size} = {here} here; resume with world_size x batch_size = "
                             f"{world * batch} (batch_size={world * batch // self.world_size} on "
                             f"{self.world_size} ranks, when it divides)")
        consumed = int(state["sequences_consumed"])
        nb = self.batches_per_epoch
        if consumed % batch or not 0 <= consumed <= nb * batch:
            raise ValueError(f"loader state sequences_consumed={consumed} is not a whole number of batches of "
                             f"{batch} within the epoch's {nb} batches")
        layout = state.get("layout", "contiguous")  # versions 1 and 2 cut the stream at q * S
        if layout not in LAYOUTS:
            raise ValueError(f"loader state layout={layout!r}; this loader knows {LAYOUTS}")
        if layout != self.layout:
            self.layout = layout
            self._plan_stream()
        self._adopt_partitions(int(state.get("partitions", world)))
        self.epoch, self.sequences_consumed = int(state["epoch"]), consumed // batch * self.config.batch_size
        if self.mix_plan is not None:
            for cursor in state.get("mix_cursors", []):
                self.mix_plan.keep(mix.Cursor.from_list(cursor, self.mix_plan))

    def _adopt_partitions(self, partitions: int) -> None:
        """The checkpoint's canonical partitions (they fix the global batches), if this world size can share them."""
        if partitions == self.partitions:
            return
        if self.config.partitions:
            raise ValueError(f"loader state does not fit: partitions={partitions} in the checkpoint but "
                             f"{self.partitions} here; pass partitions={partitions} (or 0 to take the checkpoint's)")
        if partitions % self.world_size:
            raise ValueError(f"loader state does not fit: its {partitions} canonical partitions cannot be shared "
                             f"by {self.world_size} ranks (the world size must divide them); resume on a world "
                             f"size dividing {partitions}, or start runs with LoaderConfig(partitions=N), N a "
                             f"multiple of every world size to resume on")
        self.partitions = check_partitions(partitions, world_size=self.world_size,
                                           batch_size=self.config.batch_size)
        self._plan_stream()


__all__ = ["LoaderConfig", "MLMLoader", "SourceError", "MASK_ON", "STATE_VERSION", "open_dataset"]
