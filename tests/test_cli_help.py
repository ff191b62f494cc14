"""Every command and group has help with an Example: block, printed as written.

The walk starts at `replicator.cli.cli` and recurses into groups, so a command
added later is covered without touching this file.
"""
from __future__ import annotations

import inspect

import click
import pytest
from click.testing import CliRunner

from replicator.cli import cli


def walk(group: click.Group, path: tuple[str, ...] = ()):
    """(path, command) for the group itself and everything under it (hidden aliases aside)."""
    yield path, group
    for name, cmd in sorted(group.commands.items()):
        if cmd.hidden:
            continue
        if isinstance(cmd, click.Group):
            yield from walk(cmd, (*path, name))
        else:
            yield (*path, name), cmd


COMMANDS = list(walk(cli))


def example_lines(cmd: click.Command) -> list[str]:
    """The lines of the docstring's Example: block, as written."""
    doc = inspect.cleandoc(cmd.help or "")
    _, found, block = doc.partition("Example:")
    return [ln.strip() for ln in block.strip("\n").splitlines() if ln.strip() and ln.strip() != "\b"] \
        if found else []


def test_the_walk_finds_the_known_commands():
    names = {" ".join(p) for p, _ in COMMANDS}
    assert {"", "hq", "hq install", "hq sql", "hq add-branch", "hq status", "hq prune",
            "check", "init", "run", "status"} <= names


@pytest.mark.parametrize("path, cmd", COMMANDS, ids=[" ".join(p) or "replicator" for p, _ in COMMANDS])
def test_help_exits_0_and_shows_examples(path: tuple[str, ...], cmd: click.Command):
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: "), result.output
    assert "Example:" in result.output, f"`replicator {' '.join(path)}` help has no Example: block"
    examples = example_lines(cmd)
    assert examples, "the Example: block is empty"
    assert all(e.startswith("replicator") for e in examples), examples
    printed = [ln.strip() for ln in result.output.splitlines()]
    for line in examples:
        # click rewraps paragraphs unless told not to: each example must keep its own line
        assert line in printed, f"example {line!r} is not printed on its own line:\n{result.output}"
    assert cmd.get_short_help_str(), "a one-line summary for the command list"


def test_short_h_works_too():
    result = CliRunner().invoke(cli, ["-h"])
    assert result.exit_code == 0 and "Commands:" in result.output
