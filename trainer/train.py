"""`maskstream train` / `torchrun -m maskstream.trainer`: the MLM training loop — parse, build, train, close.

One TrainConfig built from the flags; the loader streams masked batches onto the device; AdamW with warm-up
and decay, clipping, accumulation, bf16 autocast on GPU, DDP under torchrun. Writes RUN/config.json,
RUN/metrics.jsonl, RUN/loss.png (run_folder) and checksummed checkpoints that resume exactly (checkpoint).

A non-finite loss or gradient norm never trains on silently: --on-nonfinite stop (the default) ends the run
with one line and exit status 1 before anything is saved; --on-nonfinite skip drops that update (the step
still counts, so the schedule and the data stay where they were) and counts it in metrics.jsonl as
skipped_steps, and stops after MAX_CONSECUTIVE_SKIPS in a row.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from maskstream.errors import MissingPath, PathExists, UserError
from maskstream.flags import Parser
from maskstream.loader import documents
from maskstream.loader.documents import ATTENTIONS
from maskstream.loader.schedule import parse_schedule
from maskstream.loader.stream import LoaderConfig, MLMLoader
from maskstream.trainer import evaluate, run_folder
from maskstream.trainer.checkpoint import Checkpointer, latest
from maskstream.trainer.model import PRESETS, MLMEncoder, preset

DECAYS = {
    "linear": lambda t: 1.0 - t,
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
    "constant": lambda t: 1.0,
}
MASKINGS = ("dataset", "dynamic", "static")
ON_NONFINITE = ("stop", "skip")
MAX_CONSECUTIVE_SKIPS = 10  # a run that skips this many updates in a row has diverged: stop even under skip


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything the loop needs, recorded whole in RUN/config.json and in every checkpoint."""
    data: str
    out: str
    model_size: str = "tiny"
    hf_config: str | None = None   # a transformers config.json: train that AutoModelForMaskedLM instead (trainer.hf)
    max_steps: int = 0             # optimizer steps; 0 = derive from epochs
    epochs: float = 0.0
    batch_size: int = 32           # sequences per micro-batch per rank
    seed: int = 0
    eval_data: str | None = None
    tokenizer: str | None = None   # tokenizer.json, copied into the run for fill-mask (default: DIR/tokenizer.json)
    masking: str = "dataset"       # dataset (its index.json) | dynamic (fresh every epoch) | static (stored K copies)
    device: str = "auto"
    lr: float = 1e-3
    warmup: int = -1               # steps; -1 = 6% of the run (RoBERTa)
    decay: str = "linear"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_accum: int = 1
    clip: float = 1.0
    log_every: int = 10
    eval_every: int = 0            # 0 = evaluate once, at the end
    eval_batches: int = 0          # 0 = the whole held-out set
    save_every: int = 0            # 0 = save once, at the end
    keep_checkpoints: int = 2
    num_workers: int = 0
    loader_partitions: int = 0     # canonical partitions of the data (0: the world size); resume on any number of
                                   # processes dividing it, with processes x batch size unchanged
    dropout: float = -1.0          # -1 = the preset's
    compile: bool = False
    resume: str = ""               # "" new run | "latest" (refused without a checkpoint) | "auto" (fresh without one)
    on_nonfinite: str = "stop"     # stop | skip: what a NaN/inf loss or gradient norm does
    progress: bool = True
    attention: str = ""            # doc | full (see ATTENTIONS); "" = doc, or full with --hf-config
    mask_schedule: str = ""        # "" = the dataset's mask_prob | constant:P | linear:P0:P1 | cosine:P0:P1
    mask_only: bool = False        # every selected token becomes the mask token (no 10 % random, 10 % unchanged)

    def __post_init__(self):
        if self.model_size not in PRESETS:
            raise ValueError(f"--model-size {self.model_size!r}; choose one of {', '.join(PRESETS)}")
        if (self.max_steps > 0) == (self.epochs > 0):
            raise ValueError(f"give exactly one of --max-steps (got {self.max_steps}) and --epochs "
                             f"(got {self.epochs}), e.g. --max-steps 1000")
        if self.masking not in MASKINGS:
            raise ValueError(f"--masking {self.masking!r}; choose one of {MASKINGS}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"--on-nonfinite {self.on_nonfinite!r}; choose one of {', '.join(ON_NONFINITE)}")
        if self.decay not in DECAYS:
            raise ValueError(f"--decay {self.decay!r}; choose one of {', '.join(DECAYS)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device {self.device!r}; choose auto, cpu or cuda")
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if self.resume not in ("", "latest", "auto"):
            raise ValueError(f"--resume {self.resume!r}; pass --resume (the latest checkpoint) or --resume auto")
        if self.hf_config and self.dropout >= 0:
            raise ValueError(f"--dropout {self.dropout} sets the --model-size presets' dropout; with --hf-config set "
                             "it in the config file (e.g. hidden_dropout_prob, attention_probs_dropout_prob)")
        if self.attention == "":  # the default: doc for our encoder; a transformers model takes no document ids
            object.__setattr__(self, "attention", "full" if self.hf_config else "doc")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"--attention {self.attention!r}; choose one of {', '.join(ATTENTIONS)}")
        if self.attention == "doc" and self.hf_config:
            raise ValueError("--attention doc needs maskstream's encoder: an --hf-config model takes no document "
                             "ids; pass --attention full (its default)")
        if self.mask_schedule:
            parse_schedule(self.mask_schedule)
        if self.lr <= 0 or self.clip < 0:
            raise ValueError(f"--lr {self.lr} must be > 0 and --clip {self.clip} >= 0 (0 disables clipping)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_args(argv: list[str]) -> TrainConfig:
    p = Parser(prog="maskstream train", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="shard folder or URL prefix holding index.json, or a mixture "
                   "file (.json: sources with weights, see the README)")
    p.add_argument("--out", required=True, help="run folder: config, metrics, plot, checkpoints")
    p.add_argument("--model-size", default="tiny", choices=list(PRESETS), help="encoder preset")
    p.add_argument("--hf-config", default=None, metavar="CONFIG.json",
                   help="train this transformers AutoModelForMaskedLM architecture instead of --model-size (its "
                        "vocabulary size, special ids and positions come from the dataset); writes OUT/hf/ "
                        "(default: the native encoder)")
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps (give this or --epochs)")
    p.add_argument("--epochs", type=float, default=0.0, help="passes over the data (give this or --max-steps)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch per rank")
    p.add_argument("--seed", type=int, default=0, help="initial weights, data order and dynamic masks")
    p.add_argument("--eval-data", default=None, help="held-out shard folder, evaluated under a fixed mask "
                   "(default: no evaluation)")
    p.add_argument("--tokenizer", default=None, help="the dataset's tokenizer.json, copied into the run for "
                   "fill-mask (default: DIR/tokenizer.json when the dataset has one)")
    p.add_argument("--masking", default="dataset", choices=MASKINGS,
                   help="the masks the run expects; dataset: whatever the dataset holds")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--resume", nargs="?", const="latest", default="", choices=("latest", "auto"),
                   help="continue from the latest checkpoint in --out (refused when there is none); "
                        "--resume auto: continue if there is one, else start a new run (default: a new run)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=-1, help="warm-up steps (default: 6%% of the run)")
    p.add_argument("--decay", default="linear", choices=list(DECAYS), help="learning-rate decay after warm-up")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases/norms)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping; 0 disables it")
    p.add_argument("--log-every", type=int, default=10, help="steps per metrics.jsonl line (losses averaged)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations; 0: once, at the end")
    p.add_argument("--eval-batches", type=int, default=0, help="batches per evaluation; 0: the whole set")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints; 0: once, at the end")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per rank")
    p.add_argument("--loader-partitions", type=int, default=0, metavar="P", help="canonical partitions of the "
                   "data stream (default: the number of processes); a run can --resume on any number of "
                   "processes dividing P, with processes x --batch-size unchanged")
    p.add_argument("--dropout", type=float, default=-1.0, help="dropout probability; -1: the preset's")
    p.add_argument("--on-nonfinite", default="stop", choices=ON_NONFINITE, help="a NaN/inf loss or gradient "
                   "norm stops the run, or skip drops that update and counts it (skipped_steps)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--attention", default="", choices=ATTENTIONS, help="doc (default): documents packed in "
                   "one row never attend to each other, positions restart at each; full: attend across the row "
                   "(the default with --hf-config)")
    p.add_argument("--mask-schedule", default="", metavar="SCHEDULE", help="mask rate over the run, by step: "
                   "constant:P | linear:P0:P1 | cosine:P0:P1 (default: the dataset's mask_prob); "
                   "evaluation keeps the held-out set's fixed mask")
    p.add_argument("--mask-only", action="store_true", help="replace every selected token by the mask token "
                   "(instead of BERT's 80/10/10)")
    a = p.parse_args(argv)
    try:
        return TrainConfig(**vars(a))
    except ValueError as e:
        raise UserError(str(e)) from None


# ---- build -----------------------------------------------------------------------------------------------

@dataclass
class Run:
    """The runtime objects of one training run (not config: rank, device and the live modules)."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    loader: MLMLoader
    model: torch.nn.Module     # DDP-wrapped / compiled as trained
    raw_model: torch.nn.Module  # the module whose state_dict is saved: MLMEncoder, or hf.HFMaskedLM
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    eval_loader: MLMLoader | None
    # saved in checkpoints; window_*: the logging window's partial sums, so a resumed run logs what an
    # uninterrupted one does; tokens: trained so far, for the closing summary
    counters: dict = field(default_factory=lambda: {"step": 0, "skipped_steps": 0, "window_loss": 0.0,
                                                    "window_steps": 0, "tokens": 0})
    last_loss: float | None = None   # the last logged training loss (a window's mean)
    checkpointer: Checkpointer | None = None

    @property
    def step(self) -> int:
        return self.counters["step"]

    @step.setter
    def step(self, value: int) -> None:
        self.counters["step"] = value


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm is NaN or infinite: the run has diverged."""


def init_distributed(device_flag: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun."""
    want_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA device; pass --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(device_flag if ":" in device_flag else f"cuda:{local}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def warmup_steps(warmup: int, total: int) -> int:
    """--warmup as steps: -1 means 6 % of the run (RoBERTa)."""
    return warmup if warmup >= 0 else int(0.06 * total)


def lr_lambda(cfg: TrainConfig, total: int):
    warmup = warmup_steps(cfg.warmup, total)
    decay = DECAYS[cfg.decay]

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay(t)
    return f


def check_masking(cfg: TrainConfig, index: dict) -> None:
    """--masking states what the run expects; the dataset decides (static masks live in the shards)."""
    mode = index["masking"]["mode"]
    if cfg.masking != "dataset" and cfg.masking != mode:
        fix = ("preprocess with `maskstream preprocess --masking static --static-copies K`"
               if cfg.masking == "static" else "preprocess with `maskstream preprocess --masking dynamic`")
        raise UserError(f"--masking {cfg.masking} but {cfg.data} holds {mode} masks; {fix}, "
                         "or pass --masking dataset")


def recipe(cfg: TrainConfig, loader: MLMLoader) -> None:
    """--mask-only and --mask-schedule change how the loader masks: refused where masks are stored (static)."""
    if (cfg.mask_only or cfg.mask_schedule) and loader.static_copies:
        flag = "--mask-only" if cfg.mask_only else "--mask-schedule"
        raise UserError(f"{flag} needs masks made while training, but {cfg.data} stores static masks; preprocess "
                        f"with --masking dynamic, or drop {flag}")
    if cfg.mask_only:
        loader.masking = dataclasses.replace(loader.masking, mask_token_frac=1.0, random_token_frac=0.0)


def mask_rate(run: Run) -> float:
    """The mask rate of the current step: the schedule's, else the masking config's."""
    if not run.cfg.mask_schedule:
        return run.loader.masking.mask_prob
    return parse_schedule(run.cfg.mask_schedule)(run.step, run.total_steps)


def check_out(cfg: TrainConfig, rank: int) -> None:
    """--out against --resume, before anything is built: a new run never overwrites checkpoints."""
    has_checkpoint = latest(Path(cfg.out)) is not None
    if cfg.resume == "latest" and not has_checkpoint:
        raise MissingPath(f"--resume but {cfg.out} holds no checkpoint (ckpt-*.pt); drop --resume to start a new "
                          "run there, or pass --resume auto")
    if not cfg.resume and has_checkpoint:
        raise PathExists(f"{cfg.out} already holds checkpoints; pass --resume to continue it, or choose a new --out")
    if cfg.resume == "auto" and not has_checkpoint and rank == 0:
        print(f"--resume auto: {cfg.out} holds no checkpoint; starting a new run", file=sys.stderr)


def model_flag(train: dict) -> str:
    """The flag that chose a run's model, from its TrainConfig dict: for messages."""
    return f"--hf-config {train['hf_config']}" if train.get("hf_config") else f"--model-size {train['model_size']}"


def check_length(cfg: TrainConfig, loader: MLMLoader, max_len: int, what: str) -> None:
    """The dataset's sequences fit the model."""
    if loader.seq_len > max_len:
        raise UserError(f"{what} {loader.root} holds sequences of {loader.seq_len} tokens but the "
                        f"{model_flag(cfg.to_dict())} model of this run accepts at most {max_len}; "
                        f"preprocess it with --seq-len {max_len} or less")


def build(cfg: TrainConfig) -> Run:
    rank, world, device = init_distributed(cfg.device)
    check_out(cfg, rank)
    loader = MLMLoader(cfg.data, LoaderConfig(batch_size=cfg.batch_size, seed=cfg.seed,
                                              num_workers=cfg.num_workers, partitions=cfg.loader_partitions),
                       rank=rank, world_size=world, device=str(device))
    check_masking(cfg, loader.index)
    recipe(cfg, loader)
    torch.manual_seed(cfg.seed)  # the initial weights: the same on every rank
    raw = new_model(cfg, loader, rank).to(device)
    model_cfg = raw.config
    if isinstance(raw, MLMEncoder):
        raw.kernel = "flex" if device.type == "cuda" else "sdpa"  # document masks: flex skips masked blocks on GPUs
    torch.manual_seed(cfg.seed * 1000 + rank)  # dropout: a different stream per rank, saved in checkpoints
    decay = [p for p in raw.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")
    per_epoch = loader.batches_per_epoch // cfg.grad_accum
    if per_epoch < 1 and cfg.epochs > 0:
        raise UserError(f"{loader.batches_per_epoch} batches per epoch < --grad-accum {cfg.grad_accum}")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    model = raw
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_loader = None
    if cfg.eval_data:
        eval_loader = evaluate.eval_loader(cfg.eval_data, batch_size=cfg.batch_size, rank=rank, world=world,
                                           device=str(device))
        check_length(cfg, eval_loader, model_cfg.max_len, "--eval-data")
        evaluate.check_tokenizer(loader.index.get("tokenizer"), f"--data {cfg.data}", eval_loader, "--eval-data")
    run = Run(cfg=cfg, rank=rank, world=world, device=device, loader=loader, model=model, raw_model=raw,
              optimizer=optimizer, scheduler=scheduler, total_steps=total, eval_loader=eval_loader)
    out = Path(cfg.out)
    if rank == 0:
        for leftover in run_folder.remove_leftovers(out):
            print(f"note: removed {leftover.name}, left by a write that was killed", file=sys.stderr)
    run.checkpointer = Checkpointer(out, {"model": raw, "optimizer": optimizer, "scheduler": scheduler,
                                          "loader": loader, "counters": run.counters},
                                    keep=cfg.keep_checkpoints, rank=rank, world=world, device=device)
    if cfg.resume:
        resume(run)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        run_folder.write_config(out, run_config(run))
        run_folder.copy_tokenizer(out, data=loader.datasets[0].root, index=loader.index, given=cfg.tokenizer)
        run_folder.truncate_metrics(out, run.step)
    return run


def new_model(cfg: TrainConfig, loader: MLMLoader, rank: int) -> torch.nn.Module:
    """The model to train, shaped by the dataset: a --model-size preset, or the --hf-config architecture."""
    if cfg.hf_config:
        from maskstream.trainer import hf
        return hf.masked_lm(cfg.hf_config, loader.index, announce=rank == 0 and not cfg.resume)
    overrides = {} if cfg.dropout < 0 else {"dropout": cfg.dropout}
    vocab = loader.vocab
    return MLMEncoder(preset(cfg.model_size, vocab_size=vocab.size, max_len=loader.seq_len, pad_id=vocab.pad_id,
                             **overrides))


def save_hf(run: Run) -> None:
    """OUT/hf/ of an --hf-config run, from the trained model (trainer.hf)."""
    if run.rank != 0 or not run.cfg.hf_config:
        return
    from maskstream.trainer import hf
    tokenizer = Path(run.cfg.out) / run_folder.TOKENIZER
    hf.save(run.raw_model, Path(run.cfg.out) / hf.HF_DIR, run_config(run),
            tokenizer_json=tokenizer.read_text() if tokenizer.is_file() else None)


def run_config(run: Run) -> dict:
    """The whole run as JSON-able values: RUN/config.json and the `config` of every checkpoint."""
    index = run.loader.index
    return {"train": run.cfg.to_dict(), "model": run.raw_model.config.to_dict(), "vocab": run.loader.vocab.to_dict(),
            "world_size": run.world, "total_steps": run.total_steps,
            "dataset": {k: index.get(k) for k in ("seq_len", "packing", "tokenizer", "masking", "counts")}}


def resume(run: Run) -> None:
    """Continue from the newest intact checkpoint in --out (a fresh start when there is none)."""
    found = run.checkpointer.load_latest()
    if found is None and latest(run.cfg.out) is not None:
        raise UserError(f"--resume: every checkpoint in {run.cfg.out} is damaged, none to resume from; move "
                        "them aside to start the run over")
    if found is None:
        return
    path, ckpt = found
    saved = ckpt["config"]
    evaluate.check_tokenizer(saved.get("dataset", {}).get("tokenizer"), f"the checkpoint {path}", run.loader,
                             "--data")
    if saved["model"] != run.raw_model.config.to_dict():
        raise UserError(f"{path} holds a {model_flag(saved['train'])} model with a different shape than "
                        f"{model_flag(run.cfg.to_dict())}; resume with the run's own flags")
    moved = len(ckpt["rng"]) != run.world
    if moved and run.rank == 0:
        print(f"note: resuming a {len(ckpt['rng'])}-process checkpoint on {run.world} processes: the data goes "
              "on with the same global batches; dropout streams start afresh on each rank", file=sys.stderr)
    try:
        # NOTE: on another world size each rank's dropout stream is seeded from (seed, rank, step) instead
        reseed = ((run.cfg.seed * 1000 + run.rank) * 1_000_003 + ckpt["step"]) % 2**63 if moved else None
        run.checkpointer.restore(ckpt, path, reseed=reseed)
    except ValueError as e:  # a data position this world size or batch size cannot continue
        raise UserError(f"--resume from {path}: {e}") from None
    if (change := schedule_change(run, saved)) and run.rank == 0:
        print(f"note: resuming {path} at step {run.step} with a changed learning-rate schedule: {change}",
              file=sys.stderr)


def schedule_change(run: Run, saved: dict) -> str:
    """What differs between the checkpoint's learning-rate schedule and this run's ("" when nothing); the new
    one applies from the resumed step on (the optimizer's lr is set to it at once)."""
    cfg, old = run.cfg, {**dataclasses.asdict(run.cfg), **saved["train"]}
    old_total = saved.get("total_steps", run.total_steps)
    pairs = {"total steps": (old_total, run.total_steps),
             "warm-up steps": (warmup_steps(old["warmup"], old_total), warmup_steps(cfg.warmup, run.total_steps)),
             "decay": (old["decay"], cfg.decay), "min lr ratio": (old["min_lr_ratio"], cfg.min_lr_ratio),
             "peak lr": (old["lr"], cfg.lr)}
    changes = [f"{name} {a} -> {b}" for name, (a, b) in pairs.items() if a != b]
    if not changes:
        return ""
    was = run.optimizer.param_groups[0]["lr"]
    # NOTE: LambdaLR's state holds the checkpoint's base lrs; the lambdas are this run's (built from its flags)
    run.scheduler.base_lrs = [cfg.lr for _ in run.optimizer.param_groups]
    for group, f in zip(run.optimizer.param_groups, run.scheduler.lr_lambdas, strict=True):
        group["lr"] = cfg.lr * f(run.scheduler.last_epoch)
    return f"{', '.join(changes)}; the learning rate goes from {was:.3g} to {run.optimizer.param_groups[0]['lr']:.3g}"


# ---- train -----------------------------------------------------------------------------------------------

def batches(loader: MLMLoader):
    """Endless stream of batches across epochs (the loader moves to the next epoch after each pass)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty and loader.batches_per_epoch == 0:
            raise RuntimeError("the dataset gives 0 batches per rank; lower --batch-size or add data")


def all_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x = x / world
    return x


def log_line(run: Run, record: dict) -> None:
    if run.rank == 0:
        run_folder.append_metrics(Path(run.cfg.out), record)


def finite_step(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """Whether this step's loss and gradient norm are finite on every rank (one sync per step)."""
    bad = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm)).to(torch.float32)
    if run.world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


def train(run: Run, *, stop_at: int = 0) -> dict:
    """Optimizer steps until total_steps (or stop_at, to simulate an interruption); returns the last
    evaluation (or {})."""
    from tqdm import tqdm

    cfg, device = run.cfg, run.device
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    stream = batches(run.loader)
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", dynamic_ncols=True,
               disable=run.rank != 0 or not cfg.progress)
    # the logging window as the checkpoint left it (float32 round-trips exactly through a Python float)
    loss_sum = torch.tensor(run.counters["window_loss"], dtype=torch.float32, device=device)
    finite_in_window = run.counters["window_steps"]
    tokens, t0, last_eval, skips_in_a_row = 0, time.perf_counter(), {}, 0
    run.model.train()
    while run.step < run.total_steps:
        step_loss = torch.zeros((), device=device)
        rate = mask_rate(run)
        if cfg.mask_schedule:
            run.loader.set_mask_rate(rate)  # the keyed rule at this step's rate: a resumed run masks the same
        for micro in range(cfg.grad_accum):
            batch = next(stream)
            sync = micro == cfg.grad_accum - 1 or run.world == 1
            ctx = run.model.no_sync() if not sync else _nullcontext()
            with ctx, amp:
                _, loss = run.model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                    **documents.attention_inputs(batch, cfg.attention))
                (loss / cfg.grad_accum).backward()
            step_loss += loss.detach() / cfg.grad_accum
            tokens += batch["input_ids"].numel() * run.world
            run.counters["tokens"] += batch["input_ids"].numel() * run.world
        # NOTE: max_norm=inf measures without clipping (the scale is exactly 1.0), so --clip 0 still checks.
        grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.clip or math.inf)
        if finite_step(run, step_loss, grad_norm):
            run.optimizer.step()
            loss_sum += step_loss
            finite_in_window += 1
            skips_in_a_row = 0
        else:
            skips_in_a_row += 1
            bar.write(skip_or_stop(run, step_loss, grad_norm, skips_in_a_row))
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        run.step += 1
        if run.step % cfg.log_every == 0 or run.step == run.total_steps:
            mean = all_mean(loss_sum, run.world).item() / finite_in_window if finite_in_window else None
            dt = time.perf_counter() - t0
            record = {"step": run.step, "epoch": round(epoch_of(run), 4), "loss": mean,
                      "lr": run.scheduler.get_last_lr()[0], "tokens_per_s": round(tokens / dt, 1),
                      "skipped_steps": run.counters["skipped_steps"], "mask_rate": rate}
            log_line(run, record)
            run.last_loss = mean
            bar.set_postfix(loss=f"{mean:.3f}" if mean is not None else "-", tok_s=f"{tokens / dt:,.0f}",
                            epoch=f"{record['epoch']:.2f}")
            loss_sum.zero_()
            tokens, t0, finite_in_window = 0, time.perf_counter(), 0
        bar.update(1)
        done = run.step == run.total_steps
        paused = time.perf_counter()  # evaluation and checkpoint time is left out of tokens/s
        if run.eval_loader is not None and (done or (cfg.eval_every and run.step % cfg.eval_every == 0)):
            last_eval = evaluate.evaluate(run.raw_model, run.eval_loader, device=device, world=run.world,
                                          max_batches=cfg.eval_batches, attention=cfg.attention,
                                          progress=cfg.progress and run.rank == 0)
            log_line(run, {"step": run.step, "epoch": round(epoch_of(run), 4),
                           **{f"eval_{k}": v for k, v in last_eval.items()}})
            bar.write(f"step {run.step}: held-out loss {last_eval['loss']:.3f}  "
                      f"accuracy {last_eval['accuracy']:.1%}  perplexity {last_eval['perplexity']:.1f}")
            run.model.train()
        if done or (cfg.save_every and run.step % cfg.save_every == 0):
            run.counters.update(window_loss=loss_sum.item(), window_steps=finite_in_window)
            run.checkpointer.save(run.step, run_config(run))
        t0 += time.perf_counter() - paused
        if run.step == stop_at:
            break
    bar.close()
    return last_eval


def skip_or_stop(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor, in_a_row: int) -> str:
    """The --on-nonfinite policy for a step whose update was not applied: raise NonFiniteError (stop, or a
    streak of skips), else count the skip and return the line to print."""
    what = f"non-finite loss {loss.item()}, gradient norm {grad_norm.item()}"
    if run.cfg.on_nonfinite == "stop" or in_a_row >= MAX_CONSECUTIVE_SKIPS:
        streak = "" if run.cfg.on_nonfinite == "stop" else f" for {in_a_row} steps in a row"
        raise NonFiniteError(f"step {run.step + 1}: {what}{streak}; the run diverged and nothing past the last "
                             "checkpoint was saved; lower --lr, raise --warmup or set --clip, then --resume "
                             "(or pass --on-nonfinite skip)")
    run.counters["skipped_steps"] += 1
    return f"step {run.step + 1}: skipped the update ({what})"


def epoch_of(run: Run) -> float:
    """Fractional epochs of data consumed."""
    per_epoch = max(1, run.loader.batches_per_epoch)
    return run.step * run.cfg.grad_accum / per_epoch


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def check_replicas(run: Run) -> None:
    """DDP must keep every rank's weights bit-identical; compare per-tensor checksums across ranks."""
    digest = [(float(p.detach().double().sum()), float(p.detach().double().square().sum()))
              for p in run.raw_model.parameters()]
    gathered = [None] * run.world
    dist.all_gather_object(gathered, digest)
    identical = all(g == gathered[0] for g in gathered)
    log_line(run, {"step": run.step, "replicas_identical": identical})
    if not identical:
        raise RuntimeError("DDP replicas diverged: the ranks hold different weights")


def close(run: Run) -> None:
    if run.world > 1:
        check_replicas(run)
    if run.rank == 0:
        run_folder.plot(Path(run.cfg.out))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def summary(run: Run, last_eval: dict, seconds: float) -> str:
    """The closing lines: what was trained, the final losses, where the results are."""
    out = Path(run.cfg.out)
    minutes, secs = divmod(int(seconds), 60)
    held = (f"; held-out loss {last_eval['loss']:.3f}, accuracy {last_eval['accuracy']:.1%}, perplexity "
            f"{last_eval['perplexity']:.1f}" if last_eval else "")
    train_loss = f"{run.last_loss:.3f}" if run.last_loss is not None else "-"
    return "\n".join([
        f"trained  {run.step:,} steps ({epoch_of(run):.2f} epochs), {run.counters['tokens']:,} tokens; this "
        f"session {minutes}m {secs:02d}s",
        f"loss     train {train_loss} (mean of the last logged window){held}",
        f"saved    {latest(out)}; plot {out / 'loss.png'}; metrics {out / 'metrics.jsonl'}",
    ])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(list(sys.argv[1:] if argv is None else argv))
    run = build(cfg)
    start = time.perf_counter()
    try:
        last_eval = train(run)
        save_hf(run)
    except NonFiniteError as e:
        print(f"maskstream train: {e}", file=sys.stderr)
        return 1
    finally:
        close(run)
    if run.rank == 0:
        print(summary(run, last_eval, time.perf_counter() - start))
    return 0
