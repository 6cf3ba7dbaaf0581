"""`maskstream experiment NAME`: the same model, data, steps and seed, trained under recipes that differ in one way.

static-vs-dynamic: BERT's K mask copies made once by the Beam job (`--masking static`; epoch e sees copy e mod K)
against RoBERTa's fresh mask every epoch on the device. doc-vs-full: attention inside each packed document
(`--attention doc`) against attention across the whole row. mask-schedule: a constant 15 % and 30 % mask rate
against a linear 30 % -> 15 % schedule (Ankner et al. 2024). Every run is scored on the same held-out sequences
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


def bundled(out: Path) -> tuple[Path, Path]:
    """(dynamic train, held-out) shard folders from the bundled corpus."""
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
    return dynamic, held


# experiment -> (args, out, dynamic training shards) -> {run name: (training shards, the run's train flags)}
EXPERIMENTS = {
    "static-vs-dynamic": lambda a, out, dynamic: {
        f"static (K={a.static_copies})": (static_twin(dynamic, out / "shards" / f"static{a.static_copies}",
                                                      a.static_copies), []),
        "dynamic": (dynamic, [])},
    "doc-vs-full": lambda a, out, dynamic: {
        "full attention": (dynamic, ["--attention", "full"]),
        "document-aware": (dynamic, ["--attention", "doc"])},
    "mask-schedule": lambda a, out, dynamic: {
        "constant 15%": (dynamic, ["--mask-schedule", "constant:0.15"]),
        "constant 30%": (dynamic, ["--mask-schedule", "constant:0.3"]),
        "linear 30->15%": (dynamic, ["--mask-schedule", "linear:0.3:0.15"])},
}
DEFAULT_STEPS = {"static-vs-dynamic": 1500, "doc-vs-full": 200, "mask-schedule": 200}  # a few CPU minutes a run


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
    p.add_argument("name", choices=list(EXPERIMENTS), help="the experiment to run")
    p.add_argument("--data", default=None, help="dynamic training shards (default: build from the bundled corpus)")
    p.add_argument("--eval-data", default=None, help="held-out shards (required with --data; default: built "
                   "from the bundled corpus)")
    p.add_argument("--out", default="experiment-run", help="work folder: shards, the runs, the plot")
    p.add_argument("--steps", type=int, default=0, help="steps per run (default: "
                   f"{', '.join(f'{k} {v}' for k, v in DEFAULT_STEPS.items())})")
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
    steps = a.steps or DEFAULT_STEPS[a.name]
    dynamic, held = (Path(a.data), Path(a.eval_data)) if a.data else bundled(out)

    from maskstream.trainer import train as trainer
    arms = EXPERIMENTS[a.name](a, out, dynamic)
    runs = {name: out / "runs" / "".join(c if c.isalnum() else "-" for c in name) for name in arms}
    results = {}
    for name, (data, extra) in arms.items():
        run = runs[name]
        print(f"\n== {name}: {a.model_size}, {steps} steps of {a.batch_size}, seed {a.seed}", flush=True)
        if run.exists():
            shutil.rmtree(run)
        trainer.main(["--data", str(data), "--eval-data", str(held), "--out", str(run), "--model-size",
                      a.model_size, "--max-steps", str(steps), "--batch-size", str(a.batch_size), "--lr",
                      str(a.lr), "--seed", str(a.seed), "--eval-every", str(max(1, steps // a.evals)),
                      "--log-every", "10", *extra])
        from maskstream.trainer.run_folder import read_metrics
        rows = read_metrics(run)
        last = [r for r in rows if "eval_loss" in r][-1]
        results[name] = {"held_out_loss": last["eval_loss"], "held_out_accuracy": last["eval_accuracy"],
                         "epochs": last["epoch"], "final_train_loss": [r for r in rows if "loss" in r][-1]["loss"]}
    plot(out, runs)
    (out / "experiment.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'run':<16} {'epochs':>6} {'train loss':>10} {'held-out loss':>13} {'held-out acc.':>13}")
    for name, r in results.items():
        print(f"{name:<16} {r['epochs']:>6.1f} {r['final_train_loss']:>10.3f} {r['held_out_loss']:>13.3f} "
              f"{r['held_out_accuracy']:>13.2%}")
    print(f"\nplot: {out / 'experiment.png'}; figures: {out / 'experiment.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
