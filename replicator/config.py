"""Load and validate ``hq.yaml`` and ``branch.yaml``.

Every error names the file, the line and the key, because the person reading
it is a branch admin with a text editor, not a Python developer.  Values are
validated here once so the rest of the code can trust them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_CATALOG_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_DURATION_RE = re.compile(r"^\s*(\d{1,9}(?:\.\d{1,6})?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


class _Map(dict):
    """A mapping that remembers the line of each key, for error messages."""

    lines: dict
    line: int


class _Str(str):
    line: int


class _Loader(yaml.SafeLoader):
    """SafeLoader that records line numbers and expands ${VAR} in strings.

    Aliases are refused: a configuration has no use for them, and a few lines of
    nested aliases (a "billion laughs") expand to more than any machine holds as soon
    as anything walks the value, an error message included.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError("YAML aliases (*name) are not supported here; write the value out",
                              getattr(self, "path", None), event.start_mark.line + 1)
        return super().compose_node(parent, index)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    result = _Map()
    result.lines = {}
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in result.lines:
            # YAML keeps the last one silently: an admin would edit the wrong line.
            raise ConfigError(f"setting appears twice (first on line {result.lines[key]}); keep one",
                              getattr(loader, "path", None), line, str(key))
        try:
            result[key] = loader.construct_object(value_node, deep=True)
        except ConfigError as e:   # e.g. ${VAR} not set: say which setting holds it
            raise e.within(str(key)) from None
        result.lines[key] = line
    return result


def _construct_str(loader: _Loader, node: yaml.ScalarNode) -> str:
    text = loader.construct_scalar(node)
    line = node.start_mark.line + 1

    def expand(m: re.Match) -> str:
        value = os.environ.get(m.group(1), m.group(2))
        if value is None:
            raise ConfigError(f"environment variable {m.group(1)} is not set; export it or "
                              f"write ${{{m.group(1)}:-default}}", getattr(loader, "path", None), line)
        return value

    out = _Str(_ENV_RE.sub(expand, text))
    out.line = line
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG, _construct_str)


# A configuration is a few kilobytes; a catalogs file for a big schema a few hundred.
MAX_CONFIG_BYTES = 1_000_000


def load_yaml(path: str | Path) -> _Map:
    """Parse a YAML file into line-aware mappings; a YAML error keeps its line.

    Bounded in time and memory whatever the file holds: size is capped, aliases are
    refused, deep nesting is an error, bytes that are not UTF-8 are named by line.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("file not found; pass the right path with -c", path) from None
    except OSError as e:
        raise ConfigError(f"cannot read file: {e.strerror}", path) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"file is larger than {MAX_CONFIG_BYTES // 1_000_000} MB; a configuration is a few "
                          "kilobytes: is this the right file?", path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8", path,
                          raw.count(b"\n", 0, e.start) + 1) from None
    loader = _Loader(text)
    loader.path = path
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise ConfigError(f"invalid YAML: {e.problem}{_yaml_hint(e.problem or '')}", path, line) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", path) from None
    except RecursionError:
        raise ConfigError("values are nested too deeply", path) from None
    finally:
        loader.dispose()
    if not isinstance(data, _Map):
        raise ConfigError("expected a mapping of settings at the top level", path, 1)
    return data


_YAML_HINTS = (
    ("'\\t'", "tabs cannot indent YAML; use spaces"),
    ("mapping values are not allowed", "check the indentation of this line and the one before, "
                                       "and quote values that contain ': '"),
    ("expected <block end>", "check the indentation: keys of one mapping must start in the same column"),
    ("could not find expected ':'", "write 'key: value' with a space after the colon"),
    ("expected ',' or '}'", "close the {...} mapping or put it on one line"),
    ("expected ',' or ']'", "close the [...] list or put it on one line"),
)


def _yaml_hint(problem: str) -> str:
    """PyYAML speaks parser; say what to change in the file."""
    for needle, hint in _YAML_HINTS:
        if needle in problem:
            return f" ({hint})"
    return ""


class _Reader:
    """Typed access to one mapping with errors that point at the file and line."""

    def __init__(self, path: str, data: _Map, prefix: str = ""):
        self.path, self.data, self.prefix = path, data, prefix

    def error(self, key: str | None, message: str, value: Any = None) -> ConfigError:
        line = self.data.lines.get(key, self.data.line) if key else self.data.line
        name = f"{self.prefix}{key}" if key else (self.prefix.rstrip(".") or None)
        return ConfigError(message, self.path, line, name, value)

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.data:
            if key not in allowed:
                raise self.error(key, f"unknown setting; expected one of {', '.join(sorted(allowed))}")

    def get(self, key: str, kind: type | tuple, default: Any = ..., ) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                where = f"add it under {self.prefix.rstrip('.')}:" if self.prefix else "add it"
                line = self.data.lines.get(key, self.data.line)
                raise ConfigError(f"missing required setting; {where}", self.path, line, f"{self.prefix}{key}")
            return default
        value = self.data[key]
        if kind is bool and not isinstance(value, bool):
            raise self.error(key, "expected true or false", value)
        numeric = kind is int or (isinstance(kind, tuple) and int in kind)
        if not isinstance(value, kind) or (numeric and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.error(key, f"expected {_KIND_NAMES.get(names, names)}", value)
        return value

    def sub(self, key: str) -> "_Reader":
        value = self.get(key, dict)
        return _Reader(self.path, value, f"{self.prefix}{key}.")

    def line(self, key: str) -> int:
        return self.data.lines.get(key, self.data.line)


_KIND_NAMES = {"str": "a string", "int": "a whole number", "dict": "a mapping",
               "list": "a list", "bool": "true or false", "int/str": "a number or duration", "int/float/str": "a number or duration"}


def parse_duration(value: Any, least: float = 0, most: float = 10 * 365 * 86400) -> timedelta:
    """'7d', '12h', '30m', '45s', '250ms', '2w' or a number of seconds, between `least` and
    `most` seconds: a typo of a few digits must not overflow or turn a poll into a busy loop."""
    m = _DURATION_RE.match(str(value)) if isinstance(value, (int, float, str)) \
        and not isinstance(value, bool) else None
    if not m:
        raise ValueError(f"not a duration like 7d, 12h, 30m, 45s or 250ms: {value!r}")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not least <= seconds <= most:
        raise ValueError(f"must be between {_human(least)} and {_human(most)} (got {value!r})")
    return timedelta(seconds=seconds)


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms"


# Words quote_ident() quotes (pg_get_keywords() with catcode <> 'U', PostgreSQL 15).
_KEYWORDS = frozenset("""
all analyse analyze and any array as asc asymmetric authorization between bigint binary bit boolean both
case cast char character check coalesce collate collation column concurrently constraint create cross
current_catalog current_date current_role current_schema current_time current_timestamp current_user dec
decimal default deferrable desc distinct do else end except exists extract false fetch float for foreign
freeze from full grant greatest group grouping having ilike in initially inner inout int integer intersect
interval into is isnull join lateral leading least left like limit localtime localtimestamp national
natural nchar none normalize not notnull null nullif numeric offset on only or order out outer overlaps
overlay placing position precision primary real references returning right row select session_user setof
similar smallint some substring symmetric table tablesample then time timestamp to trailing treat trim
true union unique user using values varchar variadic verbose when where window with xmlattributes
xmlconcat xmlelement xmlexists xmlforest xmlnamespaces xmlparse xmlpi xmlroot xmlserialize xmltable
""".split())
_NAME_PART = re.compile(r'"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*)')


def parse_identifier_path(text: str, parts: int) -> list[str]:
    """Up to `parts` dot-separated SQL identifiers, as PostgreSQL reads them: a quoted one
    exactly ("Items", "order", "a b"), an unquoted one folded to lower case (Items = items)."""
    out, pos = [], 0
    while True:
        m = _NAME_PART.match(text, pos)
        if m is None:
            raise ValueError(f"not a name like schema.table (quote \"Mixed Case\" names as in SQL): {text!r}")
        out.append(m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2).lower())
        pos = m.end()
        if pos == len(text):
            break
        if text[pos] != "." or len(out) == parts:
            raise ValueError(f"not a name like schema.table (quote \"Mixed Case\" names as in SQL): {text!r}")
        pos += 1
    return out


def parse_table_name(text: str) -> tuple[str, str]:
    """'items' -> ('public', 'items'); 'public."Items"' -> ('public', 'Items')."""
    parts = parse_identifier_path(text, 2)
    if len(parts) == 1:
        parts.insert(0, "public")
    return parts[0], parts[1]


def quote_ident(name: str) -> str:
    """The name as SQL writes it (PostgreSQL's quote_ident): quoted unless plain lower case."""
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name not in _KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def table_display(schema: str, name: str) -> str:
    """schema.table as SQL writes it, for messages and as the key of a table everywhere."""
    return f"{quote_ident(schema)}.{quote_ident(name)}"


def qualify(table: str) -> str:
    """'items' -> 'public.items'; 'pos.Items' -> 'pos.items'; 'public."Items"' stays."""
    return table_display(*parse_table_name(table))


# ---------------------------------------------------------------- HQ config

@dataclass(frozen=True)
class TableSpec:
    name: str                       # schema.table
    filter: str | None = None       # template, e.g. "store_id = :store_id"
    exclude_columns: tuple[str, ...] = ()

    @property
    def schema(self) -> str:
        return parse_table_name(self.name)[0]

    @property
    def relname(self) -> str:
        return parse_table_name(self.name)[1]


@dataclass(frozen=True)
class CatalogSpec:
    name: str
    label: str
    default: bool
    tables: tuple[TableSpec, ...]


@dataclass(frozen=True)
class Folios:
    """Where an upload keeps its per-register fiscal folios (hq status lists their gaps)."""
    table: str
    register: str
    folio: str


@dataclass(frozen=True)
class UploadSpec:
    """An upload: tables every branch sends up to HQ, each row owned by one branch.

    `tables[i].filter` is the table's owner predicate (same grammar as row filters),
    which HQ fills with the branch's registered parameters: the branch's slice."""
    name: str
    label: str
    default: bool
    tables: tuple[TableSpec, ...]
    folios: Folios | None = None


@dataclass
class HQConfig:
    path: str
    dsn: str
    retention: timedelta
    catalogs: dict[str, CatalogSpec] = field(default_factory=dict)
    uploads: dict[str, UploadSpec] = field(default_factory=dict)


def load_hq(path: str | Path) -> HQConfig:
    """Read hq.yaml: where HQ is, how long to keep the log, which catalogs exist."""
    path = str(path)
    root = _Reader(path, load_yaml(path))
    root.check_keys({"dsn", "retention", "catalogs", "catalogs_file", "uploads"})
    dsn = root.get("dsn", str)
    try:
        retention = parse_duration(root.get("retention", (int, float, str), "7d"))
    except ValueError as e:
        raise root.error("retention", str(e)) from None
    if "catalogs_file" in root.data:
        file = Path(path).parent / root.get("catalogs_file", str)
        cat_root = _Reader(str(file), load_yaml(file))
        if "catalogs" in cat_root.data:
            cat_root = cat_root.sub("catalogs")
    else:
        cat_root = root.sub("catalogs")
    catalogs = _parse_catalogs(cat_root)
    uploads = _parse_uploads(root.sub("uploads"), catalogs) if root.data.get("uploads") is not None else {}
    return HQConfig(path=path, dsn=dsn, retention=retention, catalogs=catalogs, uploads=uploads)


def _parse_uploads(ups: _Reader, catalogs: dict[str, CatalogSpec]) -> dict[str, UploadSpec]:
    """`uploads:` of hq.yaml: what branches send up and which rows each owns."""
    in_catalog = {t.name: c.name for c in catalogs.values() for t in c.tables}
    uploads: dict[str, UploadSpec] = {}
    seen: dict[str, str] = {}
    for name in ups.data:
        if not isinstance(name, str) or not _CATALOG_RE.match(name):
            raise ups.error(name, "upload ids are lower-case words like sales", name)
        if name in catalogs:
            raise ups.error(name, f"{name} is already a catalog; give the upload another id")
        spec = _parse_upload(name, ups.sub(name))
        for t in spec.tables:
            if t.name in in_catalog:
                raise ups.error(name, f"table {t.name} is in catalog {in_catalog[t.name]}: a table flows one "
                                "way, either down as a catalog or up as an upload")
            if t.name in seen:
                raise ups.error(name, f"table {t.name} is already in upload {seen[t.name]}")
            seen[t.name] = name
        uploads[name] = spec
    return uploads


def _parse_upload(name: str, up: _Reader) -> UploadSpec:
    up.check_keys({"label", "default", "tables", "owner", "owners", "folios"})
    tables = _table_names(up)
    owners = _table_map(up, "owners", tables, str)
    owner = up.get("owner", str, None)
    specs = []
    for t in tables:
        predicate = owners.get(t, owner)
        if predicate is None:
            raise up.error("owner", f"no owner predicate for {t}: HQ must say which rows each branch owns, "
                           'e.g. owner: "store_id = :store_id" (or owners: {table: predicate})')
        specs.append(TableSpec(t, predicate))
    folios = None
    if up.data.get("folios") is not None:
        f = up.sub("folios")
        f.check_keys({"table", "register", "folio"})
        try:
            table = qualify(f.get("table", str))
        except ValueError as e:
            raise f.error("table", str(e)) from None
        if table not in tables:
            raise f.error("table", f"table is not in this upload's tables ({', '.join(tables)})")
        cols = []
        for key in ("register", "folio"):
            try:
                cols += parse_identifier_path(f.get(key, str), 1)
            except ValueError:
                raise f.error(key, "expected a column name (quote \"Mixed Case\" ones as in SQL)") from None
        folios = Folios(table, *cols)
    return UploadSpec(name, str(up.get("label", str, name)), up.get("default", bool, False), tuple(specs), folios)


def _table_names(cat: _Reader) -> list[str]:
    raw_tables = cat.get("tables", list)
    if not raw_tables:
        raise cat.error("tables", "needs at least one table")
    tables = []
    for t in raw_tables:
        if not isinstance(t, str):
            raise cat.error("tables", "expected a list of table names like public.items", t)
        try:
            tables.append(qualify(t))
        except ValueError as e:
            raise cat.error("tables", str(e)) from None
    if len(set(tables)) != len(tables):
        raise cat.error("tables", "a table is listed twice")
    return tables


def _parse_catalogs(cats: _Reader) -> dict[str, CatalogSpec]:
    if not cats.data:
        raise cats.error(None, "no catalogs defined")
    catalogs: dict[str, CatalogSpec] = {}
    seen_tables: dict[str, str] = {}
    for name in cats.data:
        if not isinstance(name, str) or not _CATALOG_RE.match(name):
            raise cats.error(name, "catalog ids are lower-case words like items or payment_methods", name)
        spec = _parse_catalog(name, cats.sub(name))
        for t in spec.tables:
            if t.name in seen_tables:
                raise cats.error(name, f"table {t.name} is already in catalog {seen_tables[t.name]}")
            seen_tables[t.name] = name
        catalogs[name] = spec
    return catalogs


def _parse_catalog(name: str, cat: _Reader) -> CatalogSpec:
    cat.check_keys({"label", "default", "tables", "filter", "filters", "exclude_columns"})
    tables = _table_names(cat)
    filters = _table_map(cat, "filters", tables, str)
    catalog_filter = cat.get("filter", str, None)
    excludes = _table_map(cat, "exclude_columns", tables, list)
    specs = tuple(
        TableSpec(t, filters.get(t, catalog_filter), _columns(cat, excludes.get(t, ())))
        for t in tables)
    return CatalogSpec(name, str(cat.get("label", str, name)), cat.get("default", bool, False), specs)


def _columns(cat: _Reader, names) -> tuple[str, ...]:
    """Excluded columns, SQL identifiers like table names ("PasswordHash" keeps its case)."""
    out = []
    for c in names:
        try:
            out += parse_identifier_path(str(c), 1)
        except ValueError:
            raise cat.error("exclude_columns", "expected column names (quote \"Mixed Case\" ones as in SQL)",
                            c) from None
    return tuple(out)


def _table_map(cat: _Reader, key: str, tables: list[str], kind: type) -> dict[str, Any]:
    """Per-table settings keyed by table name; a name outside the catalog is an error."""
    if key not in cat.data or cat.data[key] is None:
        return {}
    sub = cat.sub(key)
    out = {}
    for t in sub.data:
        try:
            name = qualify(str(t))
        except ValueError as e:
            raise sub.error(t, str(e)) from None
        if name not in tables:
            raise sub.error(t, f"table is not in this catalog's tables ({', '.join(tables)})")
        out[name] = sub.get(t, kind)
    return out


# ------------------------------------------------------------ branch config

@dataclass
class BranchConfig:
    path: str
    branch: str
    source_dsn: str
    target_dsn: str
    catalogs: list[str] | None          # None: HQ's default catalogs
    uploads: list[str] | None = None    # None: HQ's default uploads
    poll_interval: float = 0.25         # seconds between probes of HQ's log while changes flow
    idle_poll_interval: float = 2.0     # ... after IDLE_AFTER seconds with none for us; twice that after a minute (session.py)
    batch_rows: int = 20000             # changes per apply transaction (bigger: more coalescing)
    lines: dict = field(default_factory=dict, repr=False)   # key -> line in the file

    def error(self, key: str, message: str, value: Any = None,
              kind: type[ConfigError] = ConfigError) -> ConfigError:
        """An error about a setting that is only found wrong later (on HQ): still file:line: key."""
        return kind(message, self.path, self.lines.get(key), key, value)


def load_branch(path: str | Path) -> BranchConfig:
    """Read branch.yaml: who we are, where HQ and the local database are."""
    path = str(path)
    root = _Reader(path, load_yaml(path))
    root.check_keys({"branch", "source", "target", "catalogs", "uploads", "poll_interval", "idle_poll_interval",
                      "batch_rows"})
    branch = root.get("branch", str)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", branch):
        raise root.error("branch", "use letters, digits, '-', '_' or '.' (max 63)", branch)
    source, target = root.sub("source"), root.sub("target")
    source.check_keys({"dsn"})
    target.check_keys({"dsn"})
    catalogs = _ids(root, "catalogs", "catalog", "[items, stock]")
    uploads = _ids(root, "uploads", "upload", "[sales]")
    poll = _interval(root, "poll_interval", "250ms")
    idle_poll = max(poll, _interval(root, "idle_poll_interval", "2s"))
    batch = root.get("batch_rows", int, 20000)
    if batch < 1:
        raise root.error("batch_rows", "must be at least 1", batch)
    return BranchConfig(path=path, branch=branch, source_dsn=source.get("dsn", str),
                        target_dsn=target.get("dsn", str), catalogs=catalogs, uploads=uploads,
                        poll_interval=poll, idle_poll_interval=idle_poll, batch_rows=batch,
                        lines=dict(root.data.lines))


def _ids(root: "_Reader", key: str, what: str, example: str) -> list[str] | None:
    ids = root.get(key, list, None)
    if ids is None:
        return None
    for c in ids:
        if not isinstance(c, str) or not _CATALOG_RE.match(c):
            raise root.error(key, f"expected a list of {what} ids like {example}", c)
    if len(set(ids)) != len(ids):
        raise root.error(key, f"a {what} is listed twice", ids)
    return ids


def _interval(root: "_Reader", key: str, default: str) -> float:
    try:
        return parse_duration(root.get(key, (int, float, str), default), 0.01, 3600).total_seconds()
    except ValueError as e:
        raise root.error(key, str(e)) from None
