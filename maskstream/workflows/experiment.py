"""`maskstream experiment static-vs-dynamic`: the same model, data, steps and seed, with static or dynamic masks.

Static: BERT's recipe, K mask copies made once by the Beam job (`--masking static`); epoch e sees copy e mod K.
Dynamic: RoBERTa's, a fresh mask every epoch on the device. Both are scored on the same held-out sequences
under the same fixed evaluation mask; the report is a table (RUN/experiment.json) and a plot (experiment.png).

With --data DIR (a dynamic shard folder made by the Beam job), its static twin is made by re-running the
Beam job on the inputs and settings recorded in DIR/index.json; --eval-data names the held-out shards.
Without --data, everything is built from the bundled corpus (as the demo does).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from maskstream.flags import Parser

# pipeline flag <- index.json config path
_PIPELINE_FLAGS = {
    "--seq-len": ("pack", "seq_len"), "--packing": ("pack", "packing"), "--seed": ("shard", "seed"),
    "--num-shards": ("shard", "num_shards"), "--block-bytes": ("shard", "block_bytes"),
    "--text-field": ("source", "text_field"), "--text-mode": ("source", "text_mode"),
    "--max-doc-chars": ("source", "max_doc_chars"), "--group-bytes": ("source", "group_bytes"),
    "--mask-prob": ("masking", "mask_prob"), "--selection": ("masking", "selection"),
}


def static_twin(data: Path, out: Path, copies: int) -> Path:
    """Re-run the Beam job that made `data` with --masking static --static-copies K: the same sequences (the
    uids differ: the masking is part of the data hash)."""
    from maskstream.pipeline import run as beam_job

    index = json.loads((data / "index.json").read_text())
    config = index["config"]
    # NOTE: index.json records local inputs and the tokenizer as absolute paths, so this works from any folder
    argv = ["--input", *config["source"]["inputs"], "--tokenizer", config["tokenize"]["tokenizer"],
            "--output", str(out), "--masking", "static", "--static-copies", str(copies)]
    for source_id in config["source"].get("source_ids", ()):
        argv += ["--source-id", source_id]
    for flag, (section, key) in _PIPELINE_FLAGS.items():
        argv += [flag, str(config[section][key])]
    beam_job.run(argv)
    if (data / "tokenizer.json").is_file():
        shutil.copyfile(data / "tokenizer.json", out / "tokenizer.json")
    twin = json.loads((out / "index.json").read_text())
    if twin["counts"]["sequences"] != index["counts"]["sequences"]:
        raise RuntimeError(f"the static twin of {data} holds {twin['counts']['sequences']} sequences, not "
                           f"{index['counts']['sequences']}: its inputs changed since; re-run both")
    return out


def bundled(out: Path, copies: int) -> tuple[Path, Path, Path]:
    """(dynamic train, static train, held-out) shard folders from the bundled corpus."""
    from maskstream.pipeline import tokenizer as tokenizers
    from maskstream.workflows import demo

    cfg = demo.MODES["experiment"]
    train_corpus, held_corpus, _ = demo.split_corpus(out / "corpus", cfg)
    tok = tokenizers.train(tokenizers.sample_texts([str(train_corpus)], text_field="text", sample_bytes=0),
                           kind="wordpiece", vocab_size=cfg.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    dynamic = out / "shards" / "dynamic"
    demo.preprocess(train_corpus, out / "tokenizer.json", dynamic, cfg, quick=False)
    held = out / "shards" / "held_out"
    demo.preprocess(held_corpus, out / "tokenizer.json", held, cfg, quick=False)
    return dynamic, static_twin(dynamic, out / "shards" / f"static{copies}", copies), held


def plot(out: Path, runs: dict[str, Path]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maskstream.trainer.run_folder import read_metrics

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        rows = read_metrics(run)
        held = [(r["epoch"], r["eval_loss"], r["eval_accuracy"]) for r in rows if "eval_loss" in r]
        line, = left.plot([r["epoch"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r],
                          lw=0.8, alpha=0.6, label=f"{name} train")
        left.plot([h[0] for h in held], [h[1] for h in held], "o-", color=line.get_color(),
                  label=f"{name} held-out")
        right.plot([h[0] for h in held], [100 * h[2] for h in held], "o-", color=line.get_color(), label=name)
    left.set(xlabel="epoch", ylabel="MLM loss (nats)", title="loss (held-out: fixed mask)")
    right.set(xlabel="epoch", ylabel="masked-token accuracy (%)", title="held-out accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "experiment.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="maskstream experiment", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=["static-vs-dynamic"], help="the experiment to run")
    p.add_argument("--data", default=None, help="dynamic training shards (default: build from the bundled corpus)")
    p.add_argument("--eval-data", default=None, help="held-out shards (required with --data; default: built "
                   "from the bundled corpus)")
    p.add_argument("--out", default="experiment-run", help="work folder: shards, both runs, the plot")
    p.add_argument("--steps", type=int, default=1500, help="training steps of each run")
    p.add_argument("--static-copies", type=int, default=2, help="K static masks (BERT: 10 over 40 epochs)")
    p.add_argument("--model-size", default="tiny", help="encoder preset of both runs")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="initial weights, data order and masks of both runs")
    p.add_argument("--evals", type=int, default=6, help="held-out evaluations along each run")
    a = p.parse_args(argv)
    if a.data and not a.eval_data:
        p.error("--data needs --eval-data (held-out shards made by the same tokenizer)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.data:
        dynamic, held = Path(a.data), Path(a.eval_data)
        static = static_twin(dynamic, out / "shards" / f"static{a.static_copies}", a.static_copies)
    else:
        dynamic, static, held = bundled(out, a.static_copies)

    from maskstream.trainer import train as trainer
    runs = {f"static (K={a.static_copies})": (static, out / "static"), "dynamic": (dynamic, out / "dynamic")}
    results = {}
    for name, (data, run) in runs.items():
        print(f"\n== {name}: {a.model_size}, {a.steps} steps of {a.batch_size}, seed {a.seed}", flush=True)
        if run.exists():
            shutil.rmtree(run)
        trainer.main(["--data", str(data), "--eval-data", str(held), "--out", str(run), "--model-size",
                      a.model_size, "--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--lr",
                      str(a.lr), "--seed", str(a.seed), "--eval-every", str(max(1, a.steps // a.evals)),
                      "--log-every", "10"])
        from maskstream.trainer.run_folder import read_metrics
        rows = read_metrics(run)
        last = [r for r in rows if "eval_loss" in r][-1]
        results[name] = {"held_out_loss": last["eval_loss"], "held_out_accuracy": last["eval_accuracy"],
                         "epochs": last["epoch"], "final_train_loss": [r for r in rows if "loss" in r][-1]["loss"]}
    plot(out, {name: run for name, (_, run) in runs.items()})
    (out / "experiment.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'masking':<16} {'epochs':>6} {'train loss':>10} {'held-out loss':>13} {'held-out acc.':>13}")
    for name, r in results.items():
        print(f"{name:<16} {r['epochs']:>6.1f} {r['final_train_loss']:>10.3f} {r['held_out_loss']:>13.3f} "
              f"{r['held_out_accuracy']:>13.2%}")
    print(f"\nplot: {out / 'experiment.png'}; figures: {out / 'experiment.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
