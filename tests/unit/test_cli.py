"""The `triptych` command line: every flag of every subcommand has help; `--version` answers."""

from __future__ import annotations

import argparse

import pytest

from triptych.cli import COMMANDS, GROUPS, build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


COMMAND_LINES = [[name] for name in COMMANDS] + [[g, name] for g, members in GROUPS.items() for name in members]


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=" ".join)
def test_every_flag_has_help(argv):
    parser = build_parser(argv)  # imports the chosen command's module only
    for word in argv:
        parser = _subparsers(parser)[word]
    flags = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert flags, f"{' '.join(argv)} has no arguments"
    missing = [a.option_strings or [a.dest] for a in flags if not a.help]
    assert not missing, f"triptych {' '.join(argv)}: no help for {missing}"


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("triptych ")
