"""Held-out evaluation under a fixed mask, the unigram baseline, and fill-mask predictions from a run folder.

`maskstream evaluate --run RUN --data DIR` (a table; --json for machines) and `maskstream fill-mask --run RUN
"text with [MASK]"` (or <mask>: either spelling stands for the tokenizer's own mask token). Tokens are shown as
the tokenizer's decoder writes them.
The evaluation mask is the masking rule at (EVAL_SEED, epoch 0): every run, every checkpoint and every
masking mode is scored on the same positions, so the numbers compare.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from maskstream.errors import MissingPath, UserError
from maskstream.flags import Parser
from maskstream.loader import documents
from maskstream.loader.maskconfig import IGNORE_INDEX
from maskstream.loader.stream import LoaderConfig, MLMLoader
from maskstream.loader.text import token_text
from maskstream.trainer import checkpoint
from maskstream.trainer.model import MLMEncoder, ModelConfig

EVAL_SEED = 20190726  # fixed: the evaluation mask never depends on the training seed


def eval_loader(data: str, *, batch_size: int, rank: int = 0, world: int = 1, device: str = "cpu") -> MLMLoader:
    """A loader whose masks are the fixed evaluation mask: the rule at (EVAL_SEED, epoch 0) for a dynamic
    dataset, stored copy 0 for a static one."""
    # NOTE: remainder "wrap" so every held-out sequence is scored; the few wrapped ones count twice.
    cfg = LoaderConfig(batch_size=batch_size, seed=EVAL_SEED, num_workers=0, remainder="wrap")
    return MLMLoader(data, cfg, rank=rank, world_size=world, device=device)


def check_tokenizer(expected: dict | None, source: str, loader: MLMLoader, what: str) -> None:
    """Refuse data made with another tokenizer than the run's (compared by the tokenizer file's sha256)."""
    want = (expected or {}).get("sha256")
    got = (loader.index.get("tokenizer") or {}).get("sha256")
    if want and got and want != got:
        raise UserError(f"{what} {loader.root} was made with tokenizer sha256 {got[:12]}…, but {source} uses "
                        f"{want[:12]}…; preprocess it with the same --tokenizer")


@torch.no_grad()
def evaluate(model: MLMEncoder, loader: MLMLoader, *, device: torch.device, world: int = 1,
             max_batches: int = 0, attention: str = "full", progress: bool = False) -> dict:
    """Held-out MLM loss (nats), masked-token accuracy, perplexity and the number of predictions; progress: a bar
    over the batches it will score.

    attention: the run's --attention (doc: documents packed in a row attend only within themselves).
    """
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    loader.set_epoch(0)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, predictions
    total = min(max_batches, loader.batches_per_epoch) if max_batches else loader.batches_per_epoch
    bar = tqdm(total=total, desc="evaluate", unit="batch", leave=False, disable=not progress)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        bar.update(1)
        with amp:
            logits, _ = model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                              **documents.attention_inputs(batch, attention))
        targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
        sums[0] += F.cross_entropy(logits.float(), targets, reduction="sum").double()
        sums[1] += (logits.argmax(dim=-1) == targets).sum()
        sums[2] += targets.numel()
    bar.close()
    if world > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    model.train(was_training)
    loss_sum, correct, n = sums.tolist()
    if n == 0:
        raise UserError("the held-out set produced no predictions; give it more sequences")
    loss = loss_sum / n
    return {"loss": loss, "accuracy": correct / n, "perplexity": math.exp(min(loss, 50.0)), "predictions": int(n)}


@torch.no_grad()
def token_counts(loader: MLMLoader, vocab_size: int, special_ids, *, progress: bool = False) -> torch.Tensor:
    """(V,) int64 counts of the non-special tokens in one epoch of a loader (original ids, not masked ones)."""
    from tqdm import tqdm

    counts = torch.zeros(vocab_size, dtype=torch.int64)
    loader.set_epoch(0)
    for batch in tqdm(loader, total=loader.batches_per_epoch, desc="count tokens", unit="batch", leave=False,
                      disable=not progress):
        labels, ids = batch["labels"].cpu(), batch["input_ids"].cpu()
        original = torch.where(labels != IGNORE_INDEX, labels, ids)[batch["attention_mask"].cpu()]
        counts += torch.bincount(original, minlength=vocab_size)
    counts[list(special_ids)] = 0
    return counts


@torch.no_grad()
def unigram_baseline(train_loader: MLMLoader, held_out: MLMLoader, *, progress: bool = False) -> dict:
    """Scores of a model that ignores context: always the most frequent training token (accuracy), and the
    training unigram distribution (loss), on the held-out fixed-mask positions."""
    vocab = train_loader.vocab
    counts = token_counts(train_loader, vocab.size, vocab.special_ids, progress=progress)
    top = int(counts.argmax())
    logp = torch.log((counts.double() + 0.5) / (counts.sum() + 0.5 * vocab.size))  # add-half smoothing
    held_out.set_epoch(0)
    correct = n = 0
    loss_sum = 0.0
    for batch in held_out:
        targets = batch["labels"][batch["labels"] != IGNORE_INDEX].cpu()
        correct += int((targets == top).sum())
        loss_sum -= float(logp[targets].sum())
        n += targets.numel()
    return {"token_id": top, "accuracy": correct / max(n, 1), "loss": loss_sum / max(n, 1), "predictions": n}


def load_run(run_dir: str | Path, *, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The run's newest intact model (eval mode; an MLMEncoder, or an hf.HFMaskedLM) and its config."""
    run_dir = Path(run_dir)
    found = checkpoint.load_latest(run_dir)
    if found is None:
        raise MissingPath(f"{run_dir} holds no intact checkpoint (ckpt-*.pt with its ckpt-*.json); train "
                          f"first with `maskstream train --out {run_dir} ...`")
    _, ckpt = found
    spec = ckpt["config"]["model"]
    if "hf" in spec:    # a `train --hf-config` run (trainer.hf)
        from maskstream.trainer.hf import HFConfig, HFMaskedLM
        model = HFMaskedLM(HFConfig(**spec))
    else:
        model = MLMEncoder(ModelConfig.from_dict(spec))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]


def run_attention(config: dict) -> str:
    """The attention a run was trained with (runs from before --attention attended across the row)."""
    return config["train"].get("attention", "full")


def load_tokenizer(run_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        raise MissingPath(f"{path} is missing: the dataset had no tokenizer.json beside index.json; "
                                "copy the tokenizer the Beam job used into the run folder")
    return Tokenizer.from_file(str(path))


MASK_SPELLINGS = ("[MASK]", "<mask>")   # what a user may write for the mask, whatever the tokenizer's own is


@torch.no_grad()
def fill_mask(model: MLMEncoder, tokenizer, vocab: dict, text: str, *, top_k: int = 5) -> list[list[tuple]]:
    """For each mask in text, the top_k (word as text, probability) predictions."""
    mask_token = tokenizer.id_to_token(vocab["mask_id"])
    for spelling in MASK_SPELLINGS:
        text = text.replace(spelling, mask_token)
    ids = tokenizer.encode(text).ids[: model.config.max_len]
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    where = (input_ids[0] == vocab["mask_id"]).nonzero().squeeze(1)
    if where.numel() == 0:
        raise UserError(f"no {mask_token} in {text!r}; write {mask_token} (or [MASK]) where a word should be "
                        "predicted")
    logits, _ = model(input_ids, torch.ones_like(input_ids, dtype=torch.bool))
    probs = logits[0, where].float().softmax(dim=-1)  # (M, V)
    special = torch.tensor(vocab["special_ids"], device=probs.device)
    probs[:, special] = 0.0  # a special token is never a word
    top = probs.topk(top_k, dim=-1)
    return [[(token_text(tokenizer, int(i)), float(p)) for p, i in zip(ps, is_, strict=False)]
            for ps, is_ in zip(top.values, top.indices, strict=False)]


def format_predictions(text: str, predictions: list[list[tuple]], mask_token: str = "[MASK]") -> str:
    lines = [text]
    for n, preds in enumerate(predictions, 1):
        lines.append(f"  {mask_token} {n}: " + "  ".join(f"{tok} ({p:.2f})" for tok, p in preds))
    return "\n".join(lines)


def format_table(rows: list[tuple[str, dict]], title: str) -> str:
    """Held-out figures as a small table: a row per (name, evaluate()-like dict with accuracy and loss)."""
    lines = [title, f"  {'':32} {'accuracy':>9} {'MLM loss':>9} {'perplexity':>11}"]
    for name, r in rows:
        lines.append(f"  {name:32} {r['accuracy']:>9.1%} {r['loss']:>9.3f} {math.exp(min(r['loss'], 50.0)):>11.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="maskstream evaluate", description="held-out MLM loss and accuracy of a run under the fixed "
               "evaluation mask")
    p.add_argument("--run", required=True, help="run folder written by `maskstream train`")
    p.add_argument("--data", required=True, help="held-out shard folder")
    p.add_argument("--baseline-data", default=None, help="training shards: also score the unigram baseline "
                   "(default: no baseline)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per evaluation batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    a = p.parse_args(argv)
    model, config = load_run(a.run, device=a.device)
    run_tokenizer = config.get("dataset", {}).get("tokenizer")
    held_out = eval_loader(a.data, batch_size=a.batch_size, device=a.device)
    check_tokenizer(run_tokenizer, f"the run {a.run}", held_out, "--data")
    if held_out.seq_len > model.config.max_len:
        raise UserError(f"--data {a.data} holds sequences of {held_out.seq_len} tokens but the model of {a.run} "
                        f"accepts at most {model.config.max_len}; preprocess it with --seq-len "
                        f"{model.config.max_len} or less")
    train = None
    if a.baseline_data:   # checked before anything is computed
        train = MLMLoader(a.baseline_data, LoaderConfig(batch_size=a.batch_size, remainder="wrap"),
                          device=a.device)
        check_tokenizer(run_tokenizer, f"the run {a.run}", train, "--baseline-data")
    result = {"run": a.run, "data": a.data, **evaluate(model, held_out, device=torch.device(a.device),
                                                     attention=run_attention(config), progress=not a.json)}
    rows = []
    if train is not None:
        base = unigram_baseline(train, held_out, progress=not a.json)
        tokenizer = load_tokenizer(a.run) if (Path(a.run) / "tokenizer.json").is_file() else None
        base["token"] = token_text(tokenizer, base["token_id"]) if tokenizer else f"#{base['token_id']}"
        result["unigram"] = base
        rows.append((f"unigram baseline ({base['token']!r})", base))
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    step = config.get("total_steps")
    rows.append((f"{config['train']['model_size']} encoder" + (f", {step:,} steps" if step else ""), result))
    print(format_table(rows, f"held-out masked-token prediction on {a.data} ({result['predictions']:,} masked "
                             "positions, fixed mask):"))
    return 0


def fill_mask_main(argv: list[str] | None = None) -> int:
    p = Parser(prog="maskstream fill-mask", description="predict the masked words of a sentence ([MASK] or <mask>)")
    p.add_argument("--run", required=True, help="run folder written by `maskstream train`")
    p.add_argument("--top-k", type=int, default=5, help="predictions shown per mask")
    p.add_argument("text", nargs="+", help='one or more sentences, e.g. "the [MASK] of the union"')
    a = p.parse_args(argv)
    model, config = load_run(a.run)
    tokenizer = load_tokenizer(a.run)
    mask_token = tokenizer.id_to_token(config["vocab"]["mask_id"])
    for text in a.text:
        predictions = fill_mask(model, tokenizer, config["vocab"], text, top_k=a.top_k)
        print(format_predictions(text, predictions, mask_token))
    return 0


if __name__ == "__main__":
    from maskstream.errors import run_command
    sys.exit(run_command("maskstream evaluate", main))
