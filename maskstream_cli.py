"""The `maskstream` console script: one entry point, a subcommand per task."""
import sys


def main(argv=None):
    raise SystemExit("maskstream: not built yet")


if __name__ == "__main__":
    main(sys.argv[1:])
