"""The Hugging Face bridge: --hf-config runs (BERT, RoBERTa, ModernBERT), RUN/hf/ in the fill-mask pipeline,
the native encoder exported as ESM with equal logits, and MLMLoader feeding a transformers.Trainer.

The datasets are built by the Beam job (through the Python API) from three SOTU addresses with a 300-token
tokenizer of each kind, so every model here is small and fast.
"""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import DATA, ROOT, write_sotu_subset

import maskstream
from maskstream import cli
from maskstream.errors import UserError
from maskstream.loader.maskconfig import IGNORE_INDEX
from maskstream.loader.stream import LoaderConfig, MLMLoader
from maskstream.trainer import checkpoint, evaluate, hf, run_folder
from maskstream.trainer.model import MLMEncoder, ModelConfig
from maskstream.trainer.train import build, close, main, parse_args, train

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"   # nothing is downloaded: every model here is built from a local config

CONFIGS = DATA / "hf-configs"   # tiny configs of three architectures, without vocabulary or special ids
KIND = {"bert": "wordpiece", "roberta": "bpe", "modernbert": "bpe"}   # the tokenizer each is tried with


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """kind -> a Beam-built dataset of 64-token sequences with a 300-token tokenizer of that kind."""
    root = tmp_path_factory.mktemp("hf_data")
    corpus = write_sotu_subset(root / "sotu3.jsonl", 3)

    @functools.cache
    def make(kind: str):
        tok = maskstream.train_tokenizer(corpus, root / f"{kind}.json", vocab_size=300, kind=kind)
        return maskstream.preprocess(corpus, tok.path, root / kind, seq_len=64, num_shards=2, quiet=True).output
    return make


def config_file(model_type: str):
    return CONFIGS / f"{model_type}-tiny.json"


def flags(data, out, *extra):
    return ["--data", str(data), "--out", str(out), "--batch-size", "4", "--seed", "3", "--log-every", "1",
            "--no-progress", *extra]


def without_dropout(tmp_path):
    """bert-tiny with no dropout: two ways of running it then compute the same numbers."""
    path = tmp_path / "bert.json"
    path.write_text(json.dumps({**json.loads(config_file("bert").read_text()), "hidden_dropout_prob": 0.0,
                                "attention_probs_dropout_prob": 0.0}))
    return path


def fill_mask(folder, text):
    pipe = transformers.pipeline("fill-mask", model=str(folder), device="cpu")
    return pipe(text.replace("[MASK]", pipe.tokenizer.mask_token), top_k=3)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(KIND))
def test_hf_config_trains_evaluates_and_saves_a_folder_the_fill_mask_pipeline_loads(tiny_data, tmp_path,
                                                                                     model_type):
    data = tiny_data(KIND[model_type])
    out = tmp_path / "run"
    assert main(flags(data, out, "--hf-config", str(config_file(model_type)), "--max-steps", "2",
                      "--eval-data", data, "--eval-batches", "1")) == 0
    rows = run_folder.read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and 4.5 < rows[0]["loss"] < 7   # ~ln(300)
    assert any("eval_accuracy" in r for r in rows) and checkpoint.latest(out) is not None
    tok = json.loads((out / "config.json").read_text())["dataset"]["tokenizer"]
    model_cfg = json.loads((out / "config.json").read_text())["model"]["hf"]
    assert (model_cfg["model_type"], model_cfg["vocab_size"], model_cfg["pad_token_id"], model_cfg["mask_token_id"],
            model_cfg["max_position_embeddings"] >= 64) == (model_type, 300, tok["pad_id"], tok["mask_id"], True)
    assert (out / "hf" / "model.safetensors").is_file()
    predictions = fill_mask(out / "hf", "the president of the united [MASK].")
    assert len(predictions) == 3 and all(p["token_str"] for p in predictions)
    model, config = evaluate.load_run(out)   # `maskstream evaluate` and fill-mask read such a run too
    assert isinstance(model, hf.HFMaskedLM)
    ours = evaluate.fill_mask(model, evaluate.load_tokenizer(out), config["vocab"], "the [MASK] of the union")
    assert len(ours) == 1 and len(ours[0]) == 5


@pytest.mark.slow
def test_hf_config_run_resumes_with_exactly_the_same_losses(tiny_data, tmp_path):
    train_dir = tiny_data("bpe")
    common = ("--hf-config", str(config_file("bert")), "--max-steps", "4", "--save-every", "2")
    assert main(flags(train_dir, tmp_path / "whole", *common)) == 0
    run = build(parse_args(flags(train_dir, tmp_path / "split", *common)))
    train(run, stop_at=2)
    close(run)
    assert main(flags(train_dir, tmp_path / "split", *common, "--resume")) == 0
    whole, split = (run_folder.read_metrics(tmp_path / name) for name in ("whole", "split"))
    assert [(r["step"], r["loss"]) for r in split] == [(r["step"], r["loss"]) for r in whole]


def test_mistakes_of_the_bridge_end_in_one_line(sotu_split, tmp_path, capsys):
    path = tmp_path / "gpt2.json"
    path.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="gpt2.*no AutoModelForMaskedLM"):
        main(flags(sotu_split[0], tmp_path / "run", "--hf-config", str(path), "--max-steps", "1"))
    with pytest.raises(UserError, match="missing.json does not exist"):
        main(flags(sotu_split[0], tmp_path / "run", "--hf-config", str(tmp_path / "missing.json"), "--max-steps", "1"))
    path.write_text(json.dumps({"model_type": "bert", "hidden_size": 30, "num_attention_heads": 4}))
    with pytest.raises(UserError, match="transformers refuses it: .*30"):
        main(flags(sotu_split[0], tmp_path / "run", "--hf-config", str(path), "--max-steps", "1"))
    with pytest.raises(UserError, match="set it in the config file"):   # the CLI: one line, exit 2
        main(flags(sotu_split[0], tmp_path / "run", "--hf-config", str(path), "--max-steps", "1", "--dropout", "0.1"))
    capsys.readouterr()   # the notes of the runs above
    assert cli.main(["export-hf", "--run", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1   # `maskstream export-hf: ... holds no intact checkpoint`


@pytest.mark.slow
def test_native_run_exports_to_esm_with_equal_logits_and_fill_mask(tiny_data, tmp_path):
    data = tiny_data("bpe")
    out = tmp_path / "run"
    assert main(flags(data, out, "--model-size", "tiny", "--max-steps", "1")) == 0
    assert hf.export_main(["--run", str(out)]) == 0
    ours, _ = evaluate.load_run(out)
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(str(out / "hf")).eval()
    batch = next(iter(evaluate.eval_loader(data, batch_size=4)))
    with torch.no_grad():
        a, _ = ours(batch["input_ids"], batch["attention_mask"])
        b = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
    real = batch["attention_mask"]   # padded positions are never attended; their outputs mean nothing
    torch.testing.assert_close(b[real], a[real], atol=1e-4, rtol=1e-4)
    text = "the state of the <mask> is strong."
    top = fill_mask(out / "hf", text)[0]
    ids = torch.tensor([evaluate.load_tokenizer(out).encode(text).ids])
    with torch.no_grad():
        logits, _ = ours(ids, torch.ones_like(ids, dtype=torch.bool))
    assert top["token"] == int(logits[0, (ids[0] == theirs.config.mask_token_id).nonzero()[0, 0]].argmax())
    assert not set(top["token_str"]) & set("ĠĊ")   # byte-level BPE decoded to text, not shown as its bytes


@pytest.mark.slow
def test_sparse_prediction_models_give_the_same_labelled_logits_and_loss():
    fields = {**json.loads(config_file("modernbert").read_text()), "vocab_size": 50, "pad_token_id": 0}
    torch.manual_seed(0)
    dense = hf.HFMaskedLM(hf.HFConfig(hf={**fields, "sparse_prediction": False}, max_len=16)).eval()
    sparse = hf.HFMaskedLM(hf.HFConfig(hf={**fields, "sparse_prediction": True}, max_len=16)).eval()
    sparse.load_state_dict(dense.state_dict())
    ids = torch.randint(5, 50, (2, 16))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3], labels[1, 7], labels[1, 9] = 11, 12, 13
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        (a, loss_a), (b, loss_b) = dense(ids, mask, labels), sparse(ids, mask, labels)
    assert a.shape == b.shape == (3, 50)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_a, loss_b)


def test_a_learned_position_table_maps_onto_esm_too():
    torch.manual_seed(0)
    ours = MLMEncoder(ModelConfig(vocab_size=50, max_len=16, n_layer=2, n_head=2, d_model=16, d_ff=32, pad_id=1,
                                  dropout=0.0, rope=False)).eval()
    theirs = hf.to_esm(ours, mask_id=4)
    ids = torch.randint(5, 50, (2, 16))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids, attention_mask=mask.long()).logits, ours(ids, mask)[0],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_mlm_loader_feeds_a_transformers_trainer_with_its_own_masks_and_resumes_exactly(tiny_data, tmp_path):
    train_dir = tiny_data("wordpiece")
    fields = {**json.loads(config_file("bert").read_text()), "vocab_size": 300, "max_position_embeddings": 64}

    def run(name, resume=None):
        seen = []

        class Recording(hf.MLMTrainer):
            def compute_loss(self, model, inputs, *args, **kwargs):
                seen.append(inputs["labels"].clone())
                return super().compute_loss(model, inputs, *args, **kwargs)

        torch.manual_seed(0)
        model = transformers.AutoModelForMaskedLM.from_config(transformers.AutoConfig.for_model(**fields))
        args = transformers.TrainingArguments(output_dir=str(tmp_path / name), max_steps=4, learning_rate=1e-3,
                                              per_device_train_batch_size=4, logging_steps=1, save_steps=2,
                                              report_to=[], use_cpu=True, disable_tqdm=True)
        loader = MLMLoader(str(train_dir), LoaderConfig(batch_size=4, seed=5))
        trainer = Recording(model=model, args=args, train_loader=loader)
        trainer.train(resume_from_checkpoint=resume)
        losses = [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]
        return seen, losses

    seen, losses = run("whole")
    fresh = [b["labels"] for _, b in zip(range(4), MLMLoader(str(train_dir), LoaderConfig(batch_size=4, seed=5)),
                                         strict=False)]
    assert len(seen) == 4 and all(torch.equal(a, b) for a, b in zip(seen, fresh, strict=True))
    assert all((labels != IGNORE_INDEX).any() for labels in seen)   # masked by our loader, no HF collator
    resumed, resumed_losses = run("resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, seen[2:], strict=True))
    assert resumed_losses == losses   # steps 1-2 from the checkpoint's history, 3-4 trained again: equal


@pytest.mark.slow
def test_mlm_trainer_evaluates_an_eval_loader_the_same_every_time_and_as_the_model_scores_it(tiny_data, tmp_path):
    data = tiny_data("wordpiece")
    fields = {**json.loads(config_file("bert").read_text()), "vocab_size": 300, "max_position_embeddings": 64}

    def trained(**evaluation):
        torch.manual_seed(0)   # the weights, and the dropout of training (bert-tiny's 0.1)
        model = transformers.AutoModelForMaskedLM.from_config(transformers.AutoConfig.for_model(**fields))
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, learning_rate=1e-3,
                                              per_device_train_batch_size=4, per_device_eval_batch_size=16,
                                              logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                              disable_tqdm=True, **evaluation)
        trainer = hf.MLMTrainer(model=model, args=args, train_loader=MLMLoader(str(data), LoaderConfig(batch_size=4)),
                                eval_loader=evaluate.eval_loader(str(data), batch_size=16))
        trainer.train()
        return model, trainer, {k: [r[k] for r in trainer.state.log_history if k in r] for k in ("loss", "eval_loss")}

    _, _, alone = trained()
    model, trainer, logged = trained(eval_strategy="steps", eval_steps=2)
    during = logged["eval_loss"]
    assert len(during) == 2 and during[0] != during[1]   # after steps 2 and 4: the model changed in between
    assert logged["loss"] == alone["loss"] and len(alone["loss"]) == 4   # evaluating changed nothing of training
    first, again = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] == again["eval_loss"] == during[1]   # the same batches and masks every time

    model.eval()   # the Trainer's number: the mean of the model's own loss over the eval batches
    with torch.no_grad():
        direct = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                        labels=b["labels"]).loss for b in evaluate.eval_loader(str(data), batch_size=16)]
    assert len(direct) == len(trainer.get_eval_dataloader()) > 2
    assert first["eval_loss"] == pytest.approx(float(torch.stack(direct).mean()), rel=1e-6)
    workers = MLMLoader(str(data), LoaderConfig(batch_size=16, seed=evaluate.EVAL_SEED, remainder="wrap",
                                                num_workers=2))
    by_name = trainer.evaluate(eval_dataset={"held": workers})   # worker processes read the same batches
    assert by_name["eval_held_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)
    predicted = trainer.predict(workers)   # and predict() gives every position's logits of the same batches
    assert predicted.metrics["test_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)
    assert predicted.predictions.shape == (len(direct) * 16, 64, 300)
    with pytest.raises(UserError, match="cannot evaluate on its train_loader"):   # it would rewind training
        trainer.evaluate(eval_dataset=trainer.train_loader)
    with pytest.raises(UserError, match="both eval_loader= and eval_dataset="):
        hf.MLMTrainer(model=model, args=trainer.args, train_loader=trainer.train_loader, eval_loader=workers,
                      eval_dataset=workers)


@pytest.mark.slow
def test_a_two_process_hf_config_run_splits_the_data_trains_as_one_process_does_and_resumes_on_one(
        tiny_data, tmp_path, capsys):
    data = tiny_data("wordpiece")
    config = without_dropout(tmp_path)
    common = ("--hf-config", str(config), "--max-steps", "4", "--save-every", "2", "--loader-partitions", "2",
              "--device", "cpu", "--eval-data", str(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer",
           *flags(data, tmp_path / "two", *common)]   # 2 x 4 sequences a step
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(flags(data, tmp_path / "one", *common, "--batch-size", "8")) == 0
    two, one = (run_folder.read_metrics(tmp_path / name) for name in ("two", "one"))
    assert two[-1] == {"step": 4, "replicas_identical": True}
    assert [r["step"] for r in two if "loss" in r] == [1, 2, 3, 4]
    # DDP averages the ranks' gradients in another summation order than one process's batch, and Adam's first
    # steps (m / sqrt(v) near +-1 for tiny gradients) amplify such 1e-7 differences: runs differed by up to
    # 3.4e-4 at step 4 on one CI run, so later steps are compared to 2e-3 (a wrong split of the data moves the
    # loss by 1e-2 and more, and step 1 is checked exactly below)
    for key in ("loss", "eval_loss", "eval_accuracy"):
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], rel=2e-3)

    # step 1's loss is the mean of the two ranks' losses on their own first batches, which differ
    loaders = [MLMLoader(str(data), LoaderConfig(batch_size=4, seed=3, partitions=2), rank=r, world_size=2)
               for r in (0, 1)]
    firsts = [next(iter(loader)) for loader in loaders]
    torch.manual_seed(3)   # the run's initial weights
    model = hf.masked_lm(str(config), loaders[0].index, announce=False)
    with torch.no_grad():
        losses = [float(model(b["input_ids"], b["attention_mask"], b["labels"])[1]) for b in firsts]
    assert not torch.equal(firsts[0]["input_ids"], firsts[1]["input_ids"]) and losses[0] != losses[1]
    assert two[0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)

    ckpt = checkpoint.load(checkpoint.latest(tmp_path / "two"))
    assert ckpt["config"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    saved, _ = evaluate.load_run(tmp_path / "two")   # what --resume, `evaluate` and fill-mask read
    exported = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "two" / "hf"))
    theirs = exported.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in saved.hf.state_dict().items())

    checkpoint.latest(tmp_path / "two").unlink()   # as if the two processes had stopped after step 2
    capsys.readouterr()
    assert main(flags(data, tmp_path / "two", *common, "--batch-size", "8", "--resume")) == 0
    assert "resuming a 2-process checkpoint on 1 processes" in capsys.readouterr().err
    resumed = run_folder.read_metrics(tmp_path / "two")
    assert [r["loss"] for r in resumed if "loss" in r] == pytest.approx([r["loss"] for r in one if "loss" in r],
                                                                         rel=2e-3)


@pytest.mark.slow
def test_compile_with_an_hf_config_trains_as_the_eager_run_and_saves_the_plain_model(tiny_data, tmp_path,
                                                                                     monkeypatch):
    """--compile's path through the loop: dynamo captures the transformers model (a graph break where the
    labelled logits are picked) and AOT autograd its backward. NOTE: the aot_eager backend leaves out only
    inductor's code generation, which takes about a minute for bert-tiny on 2 CPU cores; with it the losses
    matched to 1e-6 (ModernBERT too), measured by hand."""
    data = tiny_data("wordpiece")
    common = ("--hf-config", str(without_dropout(tmp_path)), "--max-steps", "2")
    assert main(flags(data, tmp_path / "eager", *common)) == 0
    compiled, inductor = [], torch.compile

    def aot_eager(model):
        compiled.append(model)
        return inductor(model, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", aot_eager)
    assert main(flags(data, tmp_path / "compiled", *common, "--compile")) == 0
    assert len(compiled) == 1 and isinstance(compiled[0], hf.HFMaskedLM)
    eager, graph = ([r["loss"] for r in run_folder.read_metrics(tmp_path / name)] for name in ("eager", "compiled"))
    assert graph == pytest.approx(eager, rel=1e-5)
    model, config = evaluate.load_run(tmp_path / "compiled")   # saved without the compiled wrapper's prefix
    assert config["train"]["compile"] and not any("_orig_mod" in k for k in model.state_dict())
    exported = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "compiled" / "hf"))
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in model.hf.state_dict().items())
