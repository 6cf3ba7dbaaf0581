"""Every subcommand's --help: each option has a help text and shows its default; flag mistakes are one line."""
import argparse

import pytest

from maskstream import cli, flags


class _Captured(Exception):
    pass


def subcommand_parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    """The parser each `maskstream COMMAND` builds (subcommands of `tokenizer` included), caught as it parses."""
    found = {}

    def catch(self, args=None, namespace=None):
        found[self.prog] = self
        raise _Captured

    monkeypatch.setattr(flags.Parser, "parse_known_args", catch)
    for name in cli.COMMANDS:
        with pytest.raises(_Captured):
            cli.main([name])   # a subcommand built without flags.Parser would not be caught: the test fails
    for parser in list(found.values()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.update({sub.prog: sub for sub in action.choices.values()})
    return found


def test_every_option_of_every_subcommand_has_help_and_shows_its_default(monkeypatch):
    parsers = subcommand_parsers(monkeypatch)
    assert {f"maskstream {name}" for name in cli.COMMANDS} <= set(parsers)
    assert {"maskstream tokenizer train", "maskstream tokenizer convert"} <= set(parsers)
    missing = []
    for prog, parser in parsers.items():
        formatter = parser.formatter_class(prog)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{prog} {'/'.join(action.option_strings) or action.dest}"
            text = formatter._get_help_string(action) or ""
            if not text.strip():
                missing.append(f"{name}: no help")
            elif action.option_strings and not action.required and action.default not in (False,) \
                    and "default" not in text:
                missing.append(f"{name}: default {action.default!r} not shown")
    assert not missing, "\n".join(missing)


def test_a_bad_flag_value_is_one_line_naming_the_flag_and_the_help(capsys):
    assert cli.main(["evaluate", "--run", "r", "--data", "d", "--batch-size", "many"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["maskstream evaluate: argument --batch-size: invalid int value: 'many'; see "
                   "`maskstream evaluate --help`"]
