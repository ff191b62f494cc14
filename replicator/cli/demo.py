"""`replicator demo`: HQ and two branches on throwaway local clusters, both flows live."""
from __future__ import annotations

import sys

import click

from .root import Command


@click.command(cls=Command)
@click.option("--duration", type=click.FloatRange(min=0), default=60, show_default=True, metavar="SECONDS",
              help="How long HQ keeps changing catalogs while the branches replicate.")
@click.option("--keep", is_flag=True, help="Leave the clusters running at the end and print how to connect.")
@click.option("--size", type=click.Choice(["tiny", "small", "demo"]), default="demo", show_default=True,
              help="Size of the sample chain on HQ (demo: 50,000 items, 10 stores).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=50, show_default=True,
              metavar="PER_SECOND", help="HQ transactions (price changes, stock moves, ...) per second.")
def demo(duration: float, keep: bool, size: str, rate: float) -> None:
    """Try it all on this machine: HQ, two branches, live changes, verification.

    Starts throwaway PostgreSQL clusters (HQ and two branches), loads the
    sample point-of-sale chain, installs capture, initializes store-001
    with customers and store-002 without, runs a replicator for each while
    HQ keeps changing prices, stock, customers and items, then checks that
    both branches hold exactly HQ's rows. Everything is removed at the end
    (also on Ctrl-C) unless --keep. Exit 0 when both branches match HQ.

    Example:

        replicator demo
        replicator demo --duration 10 --size tiny --keep
    """
    from ..demo import run_demo
    sys.exit(run_demo(duration, keep, size, rate))
