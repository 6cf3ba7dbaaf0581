"""The argument parser every `maskstream` subcommand uses: defaults shown in --help, mistakes as UserError.

argparse prints its usage and exits on a bad flag; here a bad or missing flag raises UserError instead, so the
CLI reports it like every other mistake (one line, exit 2; --debug shows the traceback). Imports nothing heavy.
"""
from __future__ import annotations

import argparse

from maskstream.errors import UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Module docstrings kept as written; an option's default appended to its help unless it already says it.

    A default of None or False ("not given" / a switch) is left for the help text to explain."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one-line UserErrors naming the --help to read."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message}; see `{self.prog} --help`")
