"""The bridge to Hugging Face transformers: train any AutoModelForMaskedLM, export runs, feed a Trainer.

- `maskstream train --hf-config CONFIG.json`: HFMaskedLM puts a transformers masked-LM (built from the config
  file, nothing downloaded) behind MLMEncoder's call, so the trainer loop, checkpoints, resume and evaluation
  are the native ones; vocabulary size, special ids and maximum length come from the dataset (dataset_facts).
- `maskstream export-hf --run RUN`: RUN/hf/ that `transformers` loads (`from_pretrained`, the fill-mask
  pipeline): save_pretrained weights (safetensors) and the tokenizer as a PreTrainedTokenizerFast. A native
  encoder is mapped onto EsmForMaskedLM (to_esm): of transformers' stock masked LMs, ESM-2's layout is ours
  exactly (pre-norm blocks, rotate-half rotary positions on q and k, a final LayerNorm, the dense-GELU-LayerNorm
  head with a decoder tied to the embeddings), so no custom code and no trust_remote_code is needed.
  (ModernBERT is close but normalizes the embeddings and uses a gated MLP; RoFormer is post-norm.)
- MLMTrainer: a transformers.Trainer whose training and evaluation batches, masks included, come from
  MLMLoaders.

This module is the one place that imports transformers; the rest of maskstream never needs it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn

from maskstream.errors import MissingPath, UserError
from maskstream.flags import Parser
from maskstream.loader.maskconfig import IGNORE_INDEX
from maskstream.loader.stream import MLMLoader
from maskstream.trainer.model import MLMEncoder

HF_DIR = "hf"    # RUN/hf/: what `maskstream train --hf-config` and `export-hf` write
# NOTE: these architectures number positions from pad_id + 1 (fairseq's RoBERTa), so L tokens need a table of
# L + pad_id + 1 rows (roberta-base: 512 + 2 = 514).
PAD_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                        "data2vec-text", "xmod", "esm")
ESM_RUN_KEYS = {"esm.embeddings.word_embeddings.weight": "tok_emb.weight",
                "esm.encoder.emb_layer_norm_after": "ln_f", "lm_head.dense": "head_dense",
                "lm_head.layer_norm": "head_ln", "lm_head.bias": "head_bias"}
ESM_LAYER_KEYS = {"attention.LayerNorm": "ln1", "attention.output.dense": "attn.proj", "LayerNorm": "ln2",
                  "intermediate.dense": "mlp.fc", "output.dense": "mlp.proj"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFConfig:
    """A transformers masked LM as RUN/config.json's `model` entry records it."""
    hf: dict          # the transformers config's to_dict(), model_type included
    max_len: int      # the longest sequence the run feeds it (the dataset's seq_len)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class HFMaskedLM(nn.Module):
    """Any AutoModelForMaskedLM behind MLMEncoder's call: (ids, mask, labels) -> (logits, loss); with labels the
    logits are those of the N labelled positions (N, V), in row-major order, as MLMEncoder returns them."""

    def __init__(self, config: HFConfig):
        super().__init__()
        fields = dict(config.hf)
        model_type = fields.pop("model_type")
        self.hf = transformers.AutoModelForMaskedLM.from_config(
            transformers.AutoConfig.for_model(model_type, **fields))
        self.config = config

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        mask = None if attention_mask is None else attention_mask.long()
        out = self.hf(input_ids=input_ids, attention_mask=mask, labels=labels)
        if labels is None:
            return out.logits, None
        # (B, L, V) -> (N, V); a model with sparse prediction (ModernBERT) returns (N, V) already
        logits = out.logits if out.logits.dim() == 2 else out.logits[labels != IGNORE_INDEX]
        return logits, out.loss


def read_config_file(path: str) -> dict:
    """The JSON of --hf-config, checked to name an architecture with a masked-LM head."""
    if not Path(path).is_file():
        raise MissingPath(f"--hf-config {path} does not exist; pass a transformers config.json (e.g. a "
                          "model's config.json, or one written by `BertConfig(...).to_json_file(path)`)")
    try:
        fields = json.loads(Path(path).read_text())
    except ValueError as e:
        raise UserError(f"--hf-config {path} is not JSON ({e}); pass a transformers config.json") from e
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    known = transformers.models.auto.modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if model_type not in known:
        raise UserError(f"--hf-config {path} has model_type {model_type!r}, which has no AutoModelForMaskedLM "
                        f"architecture; use one of e.g. bert, roberta, modernbert, deberta-v2, esm "
                        f"({len(known)} known)")
    return fields


def dataset_facts(fields: dict, index: dict) -> dict:
    """The config's fields with what the dataset decides: vocabulary size, special ids, and enough positions
    for its sequences (a larger table in the file is kept)."""
    tok, seq_len = index["tokenizer"], int(index["seq_len"])
    offset = tok["pad_id"] + 1 if fields["model_type"] in PAD_OFFSET_POSITIONS else 0
    ids = {"pad_token_id": tok["pad_id"], "mask_token_id": tok["mask_id"], "cls_token_id": tok["cls_id"],
           "sep_token_id": tok["sep_id"], "bos_token_id": tok["cls_id"], "eos_token_id": tok["sep_id"]}
    positions = max(int(fields.get("max_position_embeddings") or 0), seq_len + offset)
    return {**fields, "vocab_size": tok["vocab_size"], **ids, "max_position_embeddings": positions}


def masked_lm(config_path: str, index: dict, *, announce: bool = True) -> HFMaskedLM:
    """The model of `maskstream train --hf-config`: the file's architecture with the dataset's facts, new
    weights (seeded by the caller)."""
    fields = read_config_file(config_path)
    merged = dataset_facts(fields, index)
    changed = [f"{k} {merged[k]}" for k in merged if fields.get(k) != merged[k]]
    if announce and changed:
        print(f"--hf-config {config_path} ({fields['model_type']}): from the dataset: {', '.join(changed)}",
              file=sys.stderr)
    try:
        model = HFMaskedLM(HFConfig(hf=merged, max_len=int(index["seq_len"])))
    except (ValueError, TypeError) as e:   # transformers' own checks of a config (shapes, unknown values)
        raise UserError(f"--hf-config {config_path}: transformers refuses it: {str(e).splitlines()[0]}; "
                        "fix the file") from e
    # recorded as transformers completed it (every default filled in): what a resume compares
    model.config = HFConfig(hf=model.hf.config.to_dict(), max_len=model.config.max_len)
    return model


# ---- export: RUN/hf/ ---------------------------------------------------------------------------------------

def to_esm(model: MLMEncoder, *, mask_id: int) -> transformers.EsmForMaskedLM:
    """The native encoder as an EsmForMaskedLM with the same weights (see the module doc for why ESM)."""
    c = model.config
    offset = c.pad_id + 1  # ESM's learned table numbers positions from pad_id + 1 (PAD_OFFSET_POSITIONS)
    esm = transformers.EsmForMaskedLM(transformers.EsmConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        intermediate_size=c.d_ff, hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.dropout,
        max_position_embeddings=c.max_len + (0 if c.rope else offset), rope_theta=c.rope_base,
        position_embedding_type="rotary" if c.rope else "absolute", layer_norm_eps=c.layer_norm_eps,
        initializer_range=c.init_std, pad_token_id=c.pad_id, mask_token_id=mask_id, token_dropout=False,
        emb_layer_norm_before=False, tie_word_embeddings=True))
    ours = model.state_dict()
    state = esm.state_dict()
    for theirs, mine in ESM_RUN_KEYS.items():
        for key in [k for k in state if k == theirs or k.startswith(theirs + ".")]:
            state[key] = ours[mine + key[len(theirs):]]
    for i in range(c.n_layer):
        layer, block = f"esm.encoder.layer.{i}.", f"blocks.{i}."
        for theirs, mine in ESM_LAYER_KEYS.items():
            for part in ("weight", "bias"):
                state[f"{layer}{theirs}.{part}"] = ours[f"{block}{mine}.{part}"]
        for part in ("weight", "bias"):   # qkv (3d, d): rows q, then k, then v
            for name, chunk in zip(("query", "key", "value"), ours[f"{block}attn.qkv.{part}"].chunk(3), strict=True):
                state[f"{layer}attention.self.{name}.{part}"] = chunk
    state["lm_head.decoder.weight"] = ours["tok_emb.weight"]
    if not c.rope:
        table = torch.zeros_like(state["esm.embeddings.position_embeddings.weight"])
        table[offset:offset + c.max_len] = ours["pos_emb.weight"]
        state["esm.embeddings.position_embeddings.weight"] = table
    esm.load_state_dict(state)
    return esm.eval()


def hf_tokenizer(tokenizer_json: str, tokenizer: dict, *, max_len: int) -> transformers.PreTrainedTokenizerFast:
    """The run's tokenizer.json as a PreTrainedTokenizerFast with its special tokens named (tokenizer: the
    index.json entry); it returns only the inputs every masked LM takes."""
    from maskstream.pipeline.tokenizer import tokenizer_from_json
    tok = tokenizer_from_json(tokenizer_json)
    name = tok.id_to_token
    unk = next((n for n in ("[UNK]", "<unk>") if tok.token_to_id(n) is not None), None)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_len, unk_token=unk, pad_token=name(tokenizer["pad_id"]),
        mask_token=name(tokenizer["mask_id"]), cls_token=name(tokenizer["cls_id"]),
        sep_token=name(tokenizer["sep_id"]), bos_token=name(tokenizer["cls_id"]),
        eos_token=name(tokenizer["sep_id"]), model_input_names=["input_ids", "attention_mask"])


def save(model: nn.Module, out: Path, run_config: dict, *, tokenizer_json: str | None) -> Path:
    """Write `out` (save_pretrained, safetensors) from a live model and the run's config; returns out."""
    out = Path(out)
    tokenizer = run_config["dataset"]["tokenizer"]
    hf = model.hf if isinstance(model, HFMaskedLM) else to_esm(model, mask_id=tokenizer["mask_id"])
    hf.save_pretrained(out)
    if tokenizer_json is None:
        print(f"note: {out} holds no tokenizer (the run has none); copy the dataset's tokenizer.json into the "
              "run and run `maskstream export-hf` again", file=sys.stderr)
    else:
        hf_tokenizer(tokenizer_json, tokenizer, max_len=run_config["model"]["max_len"]).save_pretrained(out)
    return out


def export_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """RUN/hf/ (or `out`) from the run's newest intact checkpoint and its tokenizer copy."""
    from maskstream.trainer import evaluate, run_folder
    model, config = evaluate.load_run(run_dir)
    tokenizer = Path(run_dir) / run_folder.TOKENIZER
    text = tokenizer.read_text() if tokenizer.is_file() else None
    return save(model, Path(out) if out else Path(run_dir) / HF_DIR, config, tokenizer_json=text)


def export_main(argv: list[str] | None = None) -> int:
    p = Parser(prog="maskstream export-hf", description="a run as a folder transformers loads "
               "(from_pretrained, pipeline('fill-mask')): safetensors weights and the tokenizer")
    p.add_argument("--run", required=True, help="run folder written by `maskstream train`")
    p.add_argument("--out", default=None, help="folder to write (default: RUN/hf)")
    a = p.parse_args(argv)
    out = export_run(a.run, a.out)
    print(f"wrote {out}: load it with transformers.AutoModelForMaskedLM.from_pretrained({str(out)!r})",
          file=sys.stderr)
    return 0


# ---- transformers.Trainer ----------------------------------------------------------------------------------

class TrainerBatches:
    """An MLMLoader as a Trainer's dataloader: each masked batch as the keyword arguments of a masked LM.
    Its length is the loader's epoch, so the Trainer's epochs are the loader's epochs."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        # NOTE: the Trainer calls this at every epoch's start, a resumed one included; the loader is already
        # there (it advances with an epoch's last batch, and a resume restores its position mid-epoch)
        if epoch != self.loader.epoch:
            self.loader.set_epoch(epoch)

    def __iter__(self):
        for batch in self.loader:
            yield {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].long(),
                   "labels": batch["labels"]}


class MLMTrainer(transformers.Trainer):
    """A transformers.Trainer trained on an MLMLoader's batches, masks included (no data collator masks):
    `MLMTrainer(model=..., args=TrainingArguments(...), train_loader=MLMLoader(...))`. The loader's batch size
    is the per-device batch size; build it on `args.device`, with this process's rank and world size.

    Every checkpoint holds the loader's state_dict (LOADER_STATE), and `train(resume_from_checkpoint=...)`
    restores it, so a resumed run reads exactly the batches and masks the uninterrupted one would have.

    `eval_loader=` (an MLMLoader, or a dict of them by name, as eval_dataset takes datasets) is what
    `evaluate()` and the `eval_strategy` evaluations score, and `predict(loader)` takes one, each time from
    epoch 0: the same batches and masks every time. `maskstream.trainer.evaluate.eval_loader(...)` builds one
    with the fixed evaluation mask."""

    def __init__(self, *args, train_loader, eval_loader=None, **kwargs):
        if eval_loader is not None and kwargs.get("eval_dataset") is not None:
            raise UserError("MLMTrainer got both eval_loader= and eval_dataset=; pass one (an MLMLoader goes in "
                            "eval_loader=)")
        if eval_loader is not None:
            kwargs["eval_dataset"] = eval_loader   # so the Trainer's checks of eval_strategy see it
        super().__init__(*args, **kwargs)
        self.train_loader = train_loader
        # NOTE: the Trainer's own data skip on resume (accelerate's skip_first_batches) needs a torch DataLoader;
        # the loader seeks to its saved position instead
        self.args.ignore_data_skip = True
        self.add_callback(_SaveLoaderState(train_loader))

    def get_train_dataloader(self):
        return TrainerBatches(self.train_loader)

    def get_eval_dataloader(self, eval_dataset=None):
        loader = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(loader, str) and isinstance(self.eval_dataset, dict):   # one of a dict's, by name
            loader = self.eval_dataset.get(loader)
        if not isinstance(loader, MLMLoader):   # a datasets.Dataset with a collator: the Trainer's own way
            return super().get_eval_dataloader(eval_dataset)
        return self.from_the_start(loader)

    def get_test_dataloader(self, test_dataset):
        """predict(loader): the logits of every position of the loader's batches, from epoch 0."""
        if not isinstance(test_dataset, MLMLoader):
            return super().get_test_dataloader(test_dataset)
        return self.from_the_start(test_dataset)

    def from_the_start(self, loader: MLMLoader) -> TrainerBatches:
        """An evaluation's batches: the loader's epoch 0, every time."""
        if loader is self.train_loader:
            raise UserError("MLMTrainer cannot evaluate on its train_loader: that would move training back to "
                            "epoch 0; pass another MLMLoader (e.g. maskstream.trainer.evaluate.eval_loader(...))")
        # NOTE: a whole pass moves a loader to its next epoch, whose dynamic masks differ; every evaluation
        # starts again at epoch 0, so each one scores the same masked positions and the numbers compare
        loader.set_epoch(0)
        return TrainerBatches(loader)

    def train(self, resume_from_checkpoint=None, **kwargs):
        folder = resume_from_checkpoint
        if folder is True:
            folder = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
        if folder:
            path = Path(folder) / loader_state_name(self.train_loader.rank)
            if not path.is_file():
                raise MissingPath(f"{folder} holds no {path.name}: it was not written by MLMTrainer; resume a "
                                  "checkpoint of an MLMTrainer run, or start a new run")
            self.train_loader.load_state_dict(json.loads(path.read_text()))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def loader_state_name(rank: int) -> str:
    return f"maskstream_loader_rank{rank}.json"


class _SaveLoaderState(transformers.TrainerCallback):
    """Writes the loader's position into each checkpoint the Trainer has just saved."""

    def __init__(self, loader):
        self.loader = loader

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            (folder / loader_state_name(self.loader.rank)).write_text(json.dumps(self.loader.state_dict()))
