"""The `maskstream` console script: one entry point, a subcommand per task.

Each subcommand is owned by the package that does the work; this file only dispatches, importing lazily so
`maskstream --help` stays fast and `maskstream inspect` never imports apache_beam.
"""
import importlib
import sys

from maskstream.errors import run_command

# subcommand -> (module, function taking argv, one-line help)
COMMANDS = {
    "tokenizer": ("maskstream.pipeline.tokenizer", "main", "train a WordPiece or byte-level BPE tokenizer"),
    "preprocess": ("maskstream.pipeline.run", "main", "run the Beam job: corpus -> verified WebDataset shards"),
    "inspect": ("maskstream.loader.inspector", "main", "summarize, verify, show or dump masks of a shard folder"),
    "train": ("maskstream.trainer.train", "main", "train the MLM encoder on shards"),
    "evaluate": ("maskstream.trainer.evaluate", "main", "held-out MLM loss / accuracy of a run"),
    "fill-mask": ("maskstream.trainer.evaluate", "fill_mask_main", "predict the [MASK] words of a sentence"),
    "export-hf": ("maskstream.trainer.hf", "export_main", "a run as a folder transformers loads (fill-mask pipeline)"),
    "demo": ("maskstream.workflows.demo", "main", "tokenizer -> Beam job -> train -> evaluate on the bundled corpus"),
    "experiment": ("maskstream.workflows.experiment", "main", "static-vs-dynamic masking experiment"),
    "bench": ("maskstream.bench.run", "main", "every benchmark against its anchor, one table"),
}


def usage() -> str:
    lines = ["usage: maskstream COMMAND [options]   (maskstream COMMAND --help for its options)", ""]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "A mistake (a path, a flag) is reported in one line, exit 2; --debug or MASKSTREAM_DEBUG=1 "
              "shows its traceback."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"maskstream: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return run_command(f"maskstream {name}", lambda args: getattr(importlib.import_module(module), func)(args), rest)


if __name__ == "__main__":
    sys.exit(main())
