"""A stream: one direction of replication, as a value.

A stream has a name, a source (where changes are captured) and a target (where they are
applied), and the member the target is to the source (the branch name HQ registered).  The
name keys what the target keeps for the stream: its position, each table's copy state, the
rows set aside, and its advisory locks (`locks`).  So one target database can receive
several streams, and one database can be the source of one stream and the target of
another (both sides' objects live side by side: sql/versions.sql).

The engine carries one stream today, the catalogs from HQ down to a branch (`catalogs`).
What follows a stream's way (connections, the selection) is written once, here; the
stages below it (read, apply, state, locks) take the stream and never name a direction.
"""
from __future__ import annotations

from dataclasses import dataclass

import psycopg

from . import db
from .config import BranchConfig
from .errors import ConfigError
from .schema import Catalog, Table, branch_params, check_names, offered_catalogs, select_catalogs, source_tables

CATALOGS = "catalogs"


@dataclass(frozen=True)
class Stream:
    name: str
    source_dsn: str
    target_dsn: str
    member: str                # the target as its source registered it
    source_label: str = "HQ"   # how messages name each end
    target_label: str = "branch"
    target_pooled: bool = False  # the target is HQ (uploads): maybe behind PgBouncer, maybe multi-host


def catalogs(cfg: BranchConfig) -> Stream:
    """The catalog stream of a branch.yaml: HQ's catalogs down to this branch."""
    return Stream(CATALOGS, cfg.source_dsn, cfg.target_dsn, cfg.branch)


def multi_host(dsn: str, side: str = "HQ") -> bool:
    """A libpq DSN listing several hosts (a primary and its hot standbys) that does not
    say itself which kind of server it wants."""
    parts = db.check_dsn(dsn, side)
    return "," in (parts.get("host") or parts.get("hostaddr") or "") and "target_session_attrs" not in parts


class Ends:
    """A stream's source and target connections, opened together and closed together
    (autocommit: each stage opens the transactions it needs).

    `source` reads (windows, copies, verify); `primary` takes what writes to the source
    (position reports).  They are one connection, unless the source DSN lists several
    hosts: then reads prefer a hot standby (snapshots and the log read the same there)
    and writes go to the one that accepts them, so branches' reads scale out on HQ's
    standbys."""

    def __init__(self, stream: Stream, application: str):
        self.stream = stream
        self.application = application
        self.source: psycopg.Connection | None = None
        self.primary: psycopg.Connection | None = None
        self.target: psycopg.Connection | None = None

    def __enter__(self) -> "Ends":
        s = self.stream
        try:
            if multi_host(s.source_dsn, s.source_label):
                self.source = self._source("prefer-standby")
                self.primary = self._source("read-write")
            else:
                self.source = self.primary = self._source(None)
            self.target = db.connect(s.target_dsn, s.target_label, autocommit=True,
                                     application=self.application,
                                     session_attrs="read-write" if s.target_pooled and multi_host(s.target_dsn, s.target_label)
                                     else None)
            if s.target_pooled:
                self.target.prepare_threshold = None     # PgBouncer in transaction pooling
        except BaseException:
            self.close()
            raise
        return self

    def _source(self, attrs: str | None) -> psycopg.Connection:
        s = self.stream
        conn = db.connect(s.source_dsn, s.source_label, autocommit=True, application=self.application,
                          session_attrs=attrs)
        # A source may sit behind PgBouncer in transaction pooling, where consecutive
        # transactions run on different server connections: no prepared statements there
        # (psycopg would prepare a query run 5 times, and the next server lacks it).
        conn.prepare_threshold = None
        return conn

    def reading_standby(self) -> bool:
        return self.source is not self.primary and self.source.info.parameter_status("in_hot_standby") == "on"

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for conn in {id(c): c for c in (self.source, self.primary, self.target) if c is not None}.values():
            try:
                conn.close()
            except Exception:  # closing a broken connection must not hide the real error
                pass
        self.source = self.primary = self.target = None


@dataclass
class Selection:
    """What a stream carries for its member, as the source resolves it."""
    offered: dict[str, Catalog]   # every catalog the source has, marked granted or not
    names: list[str]              # the ones carried, in the source's order
    params: dict                  # the member's registered parameters (row filters use them)
    tables: list[Table]           # their tables as the source describes them (not yet bound)


def require_capture(source: psycopg.Connection, stream: Stream) -> None:
    """The source must have capture installed at this release's version."""
    db.require_version(source, "capture", stream.source_label)


def resolve(source: psycopg.Connection, stream: Stream, cfg: BranchConfig, choose=None) -> Selection:
    """The selection pipeline, once: the catalogs the source offers this member, those the
    config selects (`choose(offered, selected)` narrows them, e.g. init's named catalogs),
    the member's parameters, then the source's tables.  A bad selection is a config error
    before anything else is asked of the source."""
    offered = offered_catalogs(source, stream.member)
    selected = select_catalogs(cfg, offered)
    names = choose(offered, selected) if choose else selected
    params = branch_params(source, stream.member, cfg)
    return Selection(offered, names, params, source_tables(source, names))


def only_named(cfg: BranchConfig, named: list[str]):
    """A `choose` for resolve: the named catalogs, each of which must exist and be selected
    (init and verify of a catalog the stream does not carry would act on nothing it keeps)."""
    def choose(offered: dict[str, Catalog], selected: list[str]) -> list[str]:
        if not named:
            return selected
        check_names(named, offered, cfg.path)
        outside = [c for c in named if c not in selected]
        if outside:
            raise ConfigError(f"catalog {', '.join(outside)} is not selected for this branch; add it to "
                              "catalogs: first", cfg.path, None, "catalogs")
        return list(named)
    return choose
