"""The command line: a thin shell over the library, split by side.

Each command parses options, calls one library function and prints the result:
`replicator hq ...` on HQ (hq.py), the others on a branch (branch.py), and the demo
(demo.py); root.py holds the group, logging and `main`.
"""
from . import branch, demo, hq
from .root import cli, main

cli.add_command(hq.hq)
cli.add_command(demo.demo)
for _command in branch.COMMANDS:
    cli.add_command(_command)

__all__ = ["cli", "main"]
