"""Every option and argument of every `featurebank` subcommand says what it does and its default."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from featurebank.cli import build_parser

SKIP = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) for every parser of the tree, nested subcommands included."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def _arguments():
    for words, parser in _commands(build_parser()):
        for action in parser._actions:
            if not isinstance(action, SKIP):
                yield " ".join(words), parser, action


ARGUMENTS = list(_arguments())


def _rendered_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help as `--help` prints it (with %(default)s and friends filled in)."""
    return parser._get_formatter()._expand_help(action)


def _name(action: argparse.Action) -> str:
    return "/".join(action.option_strings) or action.dest


def test_the_tree_is_all_there():
    commands = {words for words, _, _ in ARGUMENTS}
    assert {"embed", "evaluate", "store info", "index build", "search", "serve", "sweep", "fewshot"} <= commands
    assert len(ARGUMENTS) > 150


@pytest.mark.parametrize("command,parser,action", ARGUMENTS, ids=[f"{w} {_name(a)}" for w, _, a in ARGUMENTS])
def test_every_argument_has_help_that_states_its_default(command, parser, action):
    assert (action.help or "").strip(), f"`featurebank {command}` {_name(action)} has no help text"
    text = _rendered_help(parser, action)
    default = action.default
    if action.option_strings and default is not None and default is not False and default != argparse.SUPPRESS:
        # a default the parser fills in is shown: "(default: 16)", or said in the help's own words
        assert re.search(r"\bdefault\b", text, re.I) and any(s in text for s in _spellings(action.default)), (
            f"`featurebank {command}` {_name(action)}: help {text!r} does not state the default {action.default!r}")


def _spellings(default) -> set[str]:
    """Ways a help text may write a default: 16, 0.25, 5 for 5.0, "avg" for ["avg"], "avg, max"."""
    if isinstance(default, (list, tuple)):
        return {", ".join(map(str, default)), ",".join(map(str, default)), str(list(default))}
    if isinstance(default, float):
        return {str(default), f"{default:g}"}
    return {str(default)}


def test_help_shows_defaults_from_the_parser():
    r = subprocess.run([sys.executable, "-m", "featurebank", "evaluate", "--help"], capture_output=True, text=True,
                       check=True)
    text = " ".join(r.stdout.split())
    assert "--test-size TEST_SIZE" in r.stdout and "(default: 0.25)" in text and "(default: 0)" in text
    assert "print the report only" in text
