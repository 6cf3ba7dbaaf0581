"""`maskstream bench` / `make bench`: every benchmark in the project, then one table against the anchors."""
from __future__ import annotations

import importlib
import sys

from maskstream.bench.common import table
from maskstream.flags import Parser

# Each module has run(args) -> list[Row]; they are run in this order.
SUITES = {
    "pipeline": "maskstream.bench.bench_pipeline",
    "dedup": "maskstream.bench.bench_dedup",
    "loader": "maskstream.bench.bench_loader",
    "scale": "maskstream.bench.bench_mix",
    "trainer": "maskstream.bench.bench_trainer",
}


def main(argv=None) -> int:
    parser = Parser(prog="maskstream bench", description=__doc__)
    parser.add_argument("--only", choices=sorted(SUITES), action="append",
                        help="run just this suite (repeatable); default: all")
    parser.add_argument("--corpus", action="append", default=None,
                        help="extra input corpus for the pipeline benchmark (repeatable; default: the bundled "
                             "SOTU corpus only)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--repeat", type=int, default=3,
                        help="pipeline: runs of the job and its anchors, medians compared")
    parser.add_argument("--workdir", default=None, help="where to write shards (default: a temp dir)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.only or list(SUITES):
        print(f"\n=== {name} ===", flush=True)
        rows += importlib.import_module(SUITES[name]).run(args)
    print("\n=== maskstream vs anchors (same run) ===")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
