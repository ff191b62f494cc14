"""README's command table is the CLI: every command is in it, nothing else is, and every
option it shows exists (as sqlite-utils' test_docs.py keeps its docs honest)."""
from __future__ import annotations

import re

import click

from harness import REPO
from replicator.cli import cli
from test_cli_help import COMMANDS

ROW = re.compile(r"^\| `replicator ([^`]+)` \|")


def _table_rows() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Operations", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for line in section.splitlines() if (m := ROW.match(line))]


def _command_of(row: str) -> tuple[tuple[str, ...], click.Command]:
    words = row.split()
    group: click.Command = cli
    path: list[str] = []
    for word in words:
        if isinstance(group, click.Group) and word in group.commands:
            group = group.commands[word]
            path.append(word)
        else:
            break
    return tuple(path), group


def test_every_command_is_in_the_readme_table_and_only_those():
    documented = {_command_of(row)[0] for row in _table_rows()}
    commands = {path for path, cmd in COMMANDS if not isinstance(cmd, click.Group)}
    undocumented = commands - documented - {("demo",)}       # the demo has its own section, Try it
    assert not undocumented, f"commands missing from README's table: {sorted(undocumented)}"
    assert documented <= commands, f"README documents commands that do not exist: {sorted(documented - commands)}"


def test_every_option_in_the_readme_table_exists():
    for row in _table_rows():
        path, cmd = _command_of(row)
        known = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
        for option in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", row):
            assert option in known, f"`replicator {row}`: {option} is not an option of {' '.join(path)}"
