"""UserError: a mistake a user can fix (a path, a flag, a mismatch); the CLI prints it as one line, exit 2.

Anything else that escapes a command is a bug in maskstream and keeps its traceback. `--debug` (any
command) or MASKSTREAM_DEBUG=1 shows the traceback of a UserError too. Imports nothing heavy.
"""
from __future__ import annotations

import os
import sys
import traceback


class UserError(ValueError):
    """A bad flag, path or value; the message names the problem and the fix."""


class MissingPath(UserError, FileNotFoundError):
    """A path the user gave does not exist."""


class PathExists(UserError, FileExistsError):
    """A path the user gave already holds something that would be overwritten."""


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(debug?, argv without --debug)."""
    debug = "--debug" in argv or os.environ.get("MASKSTREAM_DEBUG", "") not in ("", "0")
    return debug, [a for a in argv if a != "--debug"]


def run_command(prog: str, func, argv=None) -> int:
    """func(argv) with a UserError printed as `prog: message` (exit 2); the `python -m` entry points use it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, argv = debug_requested(argv)
    try:
        return int(func(argv) or 0)
    except UserError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
