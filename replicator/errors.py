"""One exception tree for everything a user can get wrong or run into.

The CLI turns any :class:`ReplicatorError` into one line on stderr and its
``exit_code``; anything else is a bug and keeps its traceback.  Messages name
the thing (file and line, table, column, branch) and say what to do next.
"""
from __future__ import annotations

import re
import reprlib

# postgresql://user:secret@host  and  password=secret / password='se cret'
_URI_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)\S*@", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&]+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide passwords inside connection strings, so no message or log line carries one."""
    text = _URI_PASSWORD.sub(r"\1***@", text)
    return _KV_PASSWORD.sub(r"\1***", text)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200
_REPR.maxlist = _REPR.maxdict = 10
_REPR.maxlevel = 3


def _short_repr(value: object) -> str:
    """A value quoted in a message, bounded whatever its size or depth."""
    return _REPR.repr(value)


class ReplicatorError(Exception):
    """Base class: a problem the user can act on. Exit code 1 (runtime)."""

    exit_code = 1


class ConfigError(ReplicatorError):
    """Bad or inconsistent configuration; nothing was touched. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 field: str | None = None, value: object = None):
        self.message, self.path, self.line, self.field, self.value = message, path, line, field, value
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        what = f"{field}: " if field else ""
        got = f" (got {redact(_short_repr(value))})" if value is not None else ""
        super().__init__(f"{where}{what}{message}{got}")

    def within(self, key: str) -> "ConfigError":
        """The same error one mapping further out: its key joins the dotted field name."""
        field = f"{key}.{self.field}" if self.field else key
        return ConfigError(self.message, self.path, self.line, field, self.value)


class UnknownCatalog(ConfigError):
    """A branch selected a catalog that HQ does not define."""


class ConnectionFailed(ReplicatorError):
    """A server could not be reached or refused us (host, port, password, TLS)."""

    def __init__(self, side: str, reason: str, retry: bool = False):
        # retry: the server or the network is away (a running replicator waits and
        # reconnects); False: a person must fix something (DSN, password, role, TLS)
        self.side, self.reason, self.retry = side, reason, retry
        super().__init__(f"cannot connect to {side}: {reason}")


class SchemaMismatch(ReplicatorError):
    """The branch table does not match HQ's; apply would corrupt or fail."""

    def __init__(self, table: str, column: str | None, problem: str):
        self.table, self.column, self.problem = table, column, problem
        where = f"{table}.{column}" if column else table
        super().__init__(f"schema mismatch on {where}: {problem}")


class NotInitialized(ReplicatorError):
    """The branch has no position yet: run `replicator init` first."""


class AlreadyInitialized(ReplicatorError):
    """Re-initializing catalogs that already hold data needs --force. Exit code 2 (usage)."""

    exit_code = 2


class PositionLost(ReplicatorError):
    """HQ pruned log rows this branch has not applied; only init can recover."""

    def __init__(self, branch: str, position: str, horizon: str):
        self.branch, self.position, self.horizon = branch, position, horizon
        super().__init__(
            f"branch {branch} fell behind the log retained on HQ "
            f"(branch position {position}, HQ keeps changes from xid {horizon}); "
            f"run `replicator init --force` to re-copy its catalogs")


class ApplyFailed(ReplicatorError):
    """The branch refused a chunk (a local constraint, bad data); it was rolled back with its position."""


class LockHeld(ReplicatorError):
    """Another replicator process already works on this branch database."""


class FilterError(ConfigError):
    """A row filter is not a plain, safe predicate over the table's columns."""

    def __init__(self, table: str, text: str, reason: str):
        self.table, self.text, self.reason = table, text, reason
        ReplicatorError.__init__(self, f"filter for {table} rejected: {reason} (filter: {text!r})")
