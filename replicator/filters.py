"""Row filters: which rows of a catalog table a branch receives.

A catalog table may carry a filter *template* such as ``store_id = :store_id``;
HQ fills the ``:name`` placeholders with the parameters it registered for each
branch (``replicator hq add-branch store-042 --param store_id=42``).

The template is written by an HQ admin but it ends up inside SQL that runs with
the branch's HQ credentials, on every poll, for hundreds of branches.  So it is
treated as untrusted input:

* :func:`parse_filter` parses it with sqlglot (postgres dialect) and accepts
  only a single boolean predicate built from an allow-list of node types over
  the table's own columns, literals and ``:name`` placeholders.  Anything else
  (statements, subqueries, arbitrary functions, comments, other tables' columns)
  is a :class:`FilterError` naming the problem, raised when the config is
  loaded, before any data moves.
* :func:`render` never pastes template text into SQL.  It rebuilds the
  predicate from the validated AST: operators and function names come from
  fixed tables in this module, column references from the caller's
  ``column`` callback, literals and parameter values as ``sql.Literal``.
  Whatever sqlglot and PostgreSQL might disagree about in the raw text
  therefore cannot change the meaning of what is executed.
* The same :class:`RowFilter` renders for the initial copy (plain column
  identifiers) and for the change stream (columns pulled out of a ``jsonb``
  row image with :func:`jsonb_column`); only the column expressions differ,
  so both paths select exactly the same rows.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal

import sqlglot
from psycopg import sql
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokens import TokenType

# The project's exception tree already defines FilterError(table, text, reason)
# under ConfigError (exit code 2); re-exported here so callers can import it
# from either module and it is one class.
from .errors import FilterError

__all__ = ["FilterError", "RowFilter", "parse_filter", "render", "jsonb_column", "MAX_LENGTH"]

MAX_LENGTH = 1000
"""Longest accepted template: a row filter is a short predicate, not a program."""

_MAX_DEPTH = 64
"""Deepest accepted expression nesting; keeps validation and rendering bounded."""

_DIALECT = sqlglot.Dialect.get_or_raise("postgres")
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# ---------------------------------------------------------------------------
# Allow-lists.  Keys are exact sqlglot node classes (looked up by type(), so a
# subclass sqlglot adds later is rejected until someone allows it here); values
# are the SQL text we emit, never text taken from the template.
# ---------------------------------------------------------------------------
_COMPARISONS = {exp.EQ: "=", exp.NEQ: "<>", exp.LT: "<", exp.LTE: "<=",
                exp.GT: ">", exp.GTE: ">="}
_PATTERNS = {exp.Like: "LIKE", exp.ILike: "ILIKE"}
_ARITHMETIC = {exp.Add: "+", exp.Sub: "-", exp.Mul: "*", exp.Div: "/"}
_CONNECTIVES = {exp.And: "AND", exp.Or: "OR"}
_UNARY_FUNCTIONS = {exp.Lower: "lower", exp.Upper: "upper", exp.Abs: "abs",
                    exp.Length: "length", exp.Trim: "trim"}
_ALLOWED_FUNCTION_NAMES = "abs, coalesce, length, lower, round, substring/substr, trim, upper"

# The arguments each accepted node may carry (sqlglot keeps options such as
# BETWEEN SYMMETRIC or trim(BOTH 'x' FROM y) as extra args; any we did not
# list here is an unusual form and refused).  Div's flags only steer
# sqlglot's own transpiling; we always emit PostgreSQL's "/".
_BINARY_ARGS = frozenset({"this", "expression"})
_NODE_ARGS = {
    exp.Div: _BINARY_ARGS | {"typed", "safe"},
    exp.Like: _BINARY_ARGS | {"negate"}, exp.ILike: _BINARY_ARGS | {"negate"},
    exp.Is: _BINARY_ARGS | {"negate"},
    exp.Between: frozenset({"this", "low", "high"}),
    exp.In: frozenset({"this", "expressions"}),
    exp.Cast: frozenset({"this", "to"}),
    exp.Column: frozenset({"this", "table", "db", "catalog"}),
    exp.Placeholder: frozenset({"this", "jdbc", "kind", "widget"}),  # see check_placeholder
    exp.Literal: frozenset({"this", "is_string"}),
    exp.Coalesce: frozenset({"this", "expressions"}),
    exp.Substring: frozenset({"this", "start", "length"}),
    exp.Round: frozenset({"this", "decimals"}),
    **{kind: frozenset({"this"}) for kind in (exp.Lower, exp.Upper, exp.Abs, exp.Length,
                                              exp.Trim, exp.Not, exp.Neg, exp.Paren,
                                              exp.Boolean)},
}

_ACCEPTED = frozenset({*_NODE_ARGS, *_COMPARISONS, *_PATTERNS, *_ARITHMETIC, *_CONNECTIVES,
                       exp.Null})

# Nodes that mean "this is a query or a statement, not a predicate".
_QUERY_NODES = (exp.Query, exp.Subquery, exp.Exists, exp.With, exp.CTE, exp.Table, exp.From)
_STATEMENT_NODES = (exp.DDL, exp.Drop, exp.DML, exp.Command, exp.Set, exp.Transaction,
                    exp.Commit, exp.Rollback)

# CAST targets: plain scalar types only, spelled as PostgreSQL's format_type does.
_CAST_TYPES = {
    exp.DataType.Type.SMALLINT: "smallint", exp.DataType.Type.INT: "integer",
    exp.DataType.Type.BIGINT: "bigint", exp.DataType.Type.DECIMAL: "numeric",
    exp.DataType.Type.FLOAT: "real", exp.DataType.Type.DOUBLE: "double precision",
    exp.DataType.Type.TEXT: "text", exp.DataType.Type.VARCHAR: "character varying",
    exp.DataType.Type.CHAR: "character", exp.DataType.Type.BPCHAR: "bpchar",
    exp.DataType.Type.BOOLEAN: "boolean", exp.DataType.Type.DATE: "date",
    exp.DataType.Type.TIME: "time", exp.DataType.Type.TIMETZ: "time",
    exp.DataType.Type.TIMESTAMP: "timestamp", exp.DataType.Type.TIMESTAMPTZ: "timestamp",
    exp.DataType.Type.UUID: "uuid", exp.DataType.Type.INTERVAL: "interval",
}
_ZONED = {exp.DataType.Type.TIMETZ: " with time zone",
          exp.DataType.Type.TIMESTAMPTZ: " with time zone",
          exp.DataType.Type.TIME: " without time zone",
          exp.DataType.Type.TIMESTAMP: " without time zone"}

# A PostgreSQL type name as format_type() prints it, for scalar types:
# optional schema, a name (plain or quoted) or one of the multi-word names,
# an optional (n) / (p,s) modifier and an optional time-zone clause.  Every
# piece is either a quoted identifier (re-quoted by psycopg) or made of
# lowercase words, digits, "(", ")" and "," - nothing that can end a cast.
_IDENT = r'(?:[a-z_][a-z0-9_$]*|"(?:[^"]|"")+")'
_TYPE_NAME = re.compile(
    rf"(?:(?P<schema>{_IDENT})\.)?"
    rf"(?P<base>character varying|bit varying|double precision|{_IDENT})"
    r"(?P<mod>\(\d+(?:,\d+)?\))?"
    r"(?P<zone> with time zone| without time zone)?"
)


@dataclass(frozen=True)
class RowFilter:
    """A validated row filter for one table.

    ``tree`` is the sqlglot AST that passed validation and ``column_types``
    the PostgreSQL types of the columns it references; :func:`render` needs
    both, nothing else should.
    """

    table: str
    text: str
    params: frozenset[str]
    tree: exp.Expression = field(repr=False, compare=False)
    column_types: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)


# ---------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------

def parse_filter(table: str, text: str, columns: Mapping[str, str] | None) -> RowFilter:
    """Parse and validate a filter template for ``table``.

    ``columns`` maps the table's column names to their PostgreSQL type names
    (``format_type`` output), or is None to check only the shape (``hq sql``
    has no database to ask).  Raises :class:`FilterError` with a specific
    reason for anything that is not a plain predicate over those columns.
    """
    def fail(reason: str) -> FilterError:
        return FilterError(table, text, reason)

    _check_text(text, fail)
    tree = _parse_one(text, fail)
    checker = _Checker(table, columns, fail)
    checker.reject_forbidden(tree)
    checker.check_condition(tree, depth=0, where="the filter")
    return RowFilter(table=table, text=text, params=frozenset(checker.params),
                     tree=tree, column_types=dict(checker.column_types))


def _check_text(text: object, fail: Callable[[str], FilterError]) -> None:
    """Cheap checks before parsing: a string, not blank, not huge."""
    if not isinstance(text, str):
        raise fail(f"filter must be a string, not {type(text).__name__}")
    if not text.strip():
        raise fail("filter is empty")
    if len(text) > MAX_LENGTH:
        raise fail(f"filter is too long ({len(text)} characters, at most {MAX_LENGTH})")


def _parse_one(text: str, fail: Callable[[str], FilterError]) -> exp.Expression:
    """Tokenize and parse ``text`` into exactly one expression.

    Comments are rejected outright rather than stripped: a filter is one short
    line, and ``store_id = 1 -- AND active`` reads as something it is not.
    Because sqlglot's tokenizer already separates string literals, ``'--'``
    inside a string is fine.
    """
    try:
        tokens = _DIALECT.tokenize(text)
    except TokenError as e:
        raise fail(f"could not parse: {_first_line(e)} (unbalanced quotes?)") from None
    if any(tok.comments for tok in tokens):
        raise fail("comments (-- or /* */) are not allowed")
    if not tokens:  # non-blank text without tokens: it was all comment
        raise fail("comments (-- or /* */) are not allowed")
    if any(tok.token_type == TokenType.SEMICOLON for tok in tokens):
        raise fail("';' is not allowed: a filter is a single predicate, not statements")
    try:
        trees = [t for t in _DIALECT.parse(text) if t is not None]
    except ParseError as e:
        raise fail(f"could not parse: {_parse_problem(e)}") from None
    except RecursionError:
        raise fail("expression is nested too deeply") from None
    if len(trees) != 1:
        raise fail(f"expected exactly one predicate, got {len(trees)} expressions")
    return trees[0]


def _parse_problem(error: ParseError) -> str:
    """sqlglot's description and column, in words: its own text can name its classes
    ("Required keyword: 'this' missing for <class 'sqlglot.expressions.EQ'>")."""
    first = (error.errors or [{}])[0]
    description = str(first.get("description") or _first_line(error))
    if "sqlglot" in description or "<class" in description or "Required keyword" in description:
        description = "incomplete expression (an operator or a value is missing)"
    col = first.get("col")
    return f"{description} near column {col}" if col else description


def _first_line(error: Exception) -> str:
    """sqlglot errors carry an ANSI-highlighted excerpt on later lines; keep the gist."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class _Checker:
    """Walks the AST, accepting only allow-listed nodes.

    Recursion is explicit: each accepted node checks exactly the children it
    knows about, so a node type or argument we did not think of is rejected,
    never silently skipped.
    """

    def __init__(self, table: str, columns: Mapping[str, str],
                 fail: Callable[[str], FilterError]):
        self.schema, _, self.table_name = table.rpartition(".")
        self.columns = columns
        self.fail = fail
        self.params: set[str] = set()
        self.column_types: dict[str, str] = {}

    # -- entry points -------------------------------------------------------

    def check_condition(self, node: exp.Expression, depth: int, where: str) -> None:
        """Check ``node`` and require it to be true/false valued."""
        self.check(node, depth)
        if not self.is_condition(node):
            raise self.fail(
                f"{where} must be a condition (true/false), such as store_id = :store_id; "
                f"got {node.sql(dialect='postgres')!r}")

    def check(self, node: exp.Expression, depth: int) -> None:
        """Check any allowed expression and its children."""
        if depth > _MAX_DEPTH:
            raise self.fail("expression is nested too deeply")
        kind = type(node)
        if kind not in _ACCEPTED:
            raise self.fail(f"{_describe(node)} is not allowed in a filter")
        self.reject_unusual_args(node)
        d = depth + 1
        if kind is exp.Paren:
            self.check(node.this, d)
        elif kind in _CONNECTIVES:
            self.check_condition(node.this, d, f"each side of {_CONNECTIVES[kind]}")
            self.check_condition(node.expression, d, f"each side of {_CONNECTIVES[kind]}")
        elif kind is exp.Not:
            self.check_condition(node.this, d, "the operand of NOT")
        elif kind in _COMPARISONS or kind in _PATTERNS or kind in _ARITHMETIC:
            self.check(node.this, d)
            self.check(node.expression, d)
        elif kind is exp.Neg:
            self.check(node.this, d)
        elif kind is exp.Is:
            self.check_is(node, d)
        elif kind is exp.Between:
            for part in (node.this, node.args["low"], node.args["high"]):
                self.check(part, d)
        elif kind is exp.In:
            self.check_in(node, d)
        elif kind is exp.Cast:
            self.check(node.this, d)
            _cast_type_name(node.to, self.fail)
        elif kind in _UNARY_FUNCTIONS:
            self.check(node.this, d)
        elif kind is exp.Coalesce:
            for arg in [node.this, *node.expressions]:
                self.check(arg, d)
        elif kind is exp.Substring:
            for key in ("this", "start", "length"):
                if node.args.get(key) is not None:
                    self.check(node.args[key], d)
        elif kind is exp.Round:
            self.check(node.this, d)
            if node.args.get("decimals") is not None:
                self.check(node.args["decimals"], d)
        elif kind is exp.Column:
            self.check_column(node)
        elif kind is exp.Placeholder:
            self.check_placeholder(node)
        elif kind is exp.Literal:
            self.check_literal(node)
        # exp.Boolean and exp.Null need no further checks.

    # -- node rules ---------------------------------------------------------

    def reject_forbidden(self, tree: exp.Expression) -> None:
        """Specific messages for the things people (or attackers) actually try.

        Runs over the whole tree before the structural check, so a subquery or
        a forbidden function is named as such wherever it hides (in an IN list,
        inside coalesce(), ...).
        """
        for node in tree.walk():
            if isinstance(node, _QUERY_NODES):
                raise self.fail("subqueries, SELECT, UNION, WITH and EXISTS are not allowed")
            if isinstance(node, _STATEMENT_NODES):
                raise self.fail("SQL statements are not allowed, only a predicate")
            if isinstance(node, exp.Parameter):
                raise self.fail(f"parameter {node.sql(dialect='postgres')} is not allowed; "
                                f"use :name placeholders")
            if isinstance(node, exp.Anonymous):
                raise self.fail(f"function {node.name}() is not allowed "
                                f"(allowed: {_ALLOWED_FUNCTION_NAMES})")
            if isinstance(node, exp.Func) and not _is_allowed_function(node):
                raise self.fail(f"function {node.sql_name().lower()}() is not allowed "
                                f"(allowed: {_ALLOWED_FUNCTION_NAMES})")

    def reject_unusual_args(self, node: exp.Expression) -> None:
        """Refuse unusual forms of allowed nodes (BETWEEN SYMMETRIC, trim(BOTH 'x' FROM y))."""
        allowed = _NODE_ARGS.get(type(node), _BINARY_ARGS)
        extra = sorted(k for k, v in node.args.items()
                       if k not in allowed and v not in (None, False, []))
        if extra:
            raise self.fail(f"this form of {_describe(node)} is not supported "
                            f"({', '.join(extra)})")

    def check_is(self, node: exp.Is, depth: int) -> None:
        """Only IS [NOT] NULL / TRUE / FALSE; IS DISTINCT FROM etc. parse differently anyway."""
        self.check(node.this, depth)
        if type(node.expression) not in (exp.Null, exp.Boolean):
            raise self.fail("IS may only be followed by NULL, TRUE or FALSE")

    def check_in(self, node: exp.In, depth: int) -> None:
        """IN takes a list of literals and placeholders: the branch's own values."""
        self.check(node.this, depth)
        if not node.expressions:
            raise self.fail("IN needs a list of values")
        for item in node.expressions:
            bare = item.this if type(item) is exp.Neg else item
            if type(bare) not in (exp.Literal, exp.Placeholder, exp.Null, exp.Boolean):
                raise self.fail(f"IN (...) may only list literals and :placeholders, "
                                f"not {item.sql(dialect='postgres')!r}")
            self.check(item, depth)

    def check_column(self, node: exp.Column) -> None:
        """A column of this table: unqualified, or qualified by the table's own name."""
        if isinstance(node.this, exp.Star):
            raise self.fail("* is not allowed; name a column")
        if node.args.get("catalog") is not None or not self.own_table(node):
            raise self.fail(f"column {node.sql(dialect='postgres')} refers to another table; "
                            f"only columns of {self.schema + '.' if self.schema else ''}"
                            f"{self.table_name} may be used")
        name = _identifier_name(node.this)
        if self.columns is None:      # syntax-only check (no database at hand)
            return
        if name not in self.columns:
            raise self.fail(f"unknown column {name!r} (columns: {', '.join(sorted(self.columns))})")
        type_name = self.columns[name]
        if _TYPE_NAME.fullmatch(type_name) is None:
            raise self.fail(f"column {name!r} has type {type_name!r}, which filters do not support")
        self.column_types[name] = type_name

    def own_table(self, node: exp.Column) -> bool:
        """True if the column's qualifier (if any) names this very table."""
        table, db = node.args.get("table"), node.args.get("db")
        if table is None:
            return db is None
        if _identifier_name(table) != self.table_name:
            return False
        return db is None or _identifier_name(db) == self.schema

    def check_placeholder(self, node: exp.Placeholder) -> None:
        """Only ``:name``: sqlglot also parses ``?`` and ``%(name)s`` as placeholders."""
        name = node.this
        odd = node.args.get("jdbc") or node.args.get("kind") or node.args.get("widget")
        if not isinstance(name, str) or odd or not _PARAM_NAME.fullmatch(name):
            raise self.fail(f"placeholder {node.sql(dialect='postgres')!r} is not allowed; "
                            f"use :name")
        self.params.add(name)

    def check_literal(self, node: exp.Literal) -> None:
        """Strings and plain decimal numbers (no hex, no national/bit/escape strings)."""
        if not node.is_string:
            _number(node.this, self.fail)

    # -- typing -------------------------------------------------------------

    def is_condition(self, node: exp.Expression) -> bool:
        """Whether ``node`` is true/false valued (as far as can be told without a server)."""
        kind = type(node)
        if kind is exp.Paren:
            return self.is_condition(node.this)
        if kind in _CONNECTIVES or kind in _COMPARISONS or kind in _PATTERNS:
            return True
        if kind in (exp.Not, exp.Is, exp.Between, exp.In, exp.Boolean):
            return True
        if kind is exp.Column:
            return self.column_types.get(_identifier_name(node.this)) == "boolean"
        if kind is exp.Cast:
            return node.to.this == exp.DataType.Type.BOOLEAN
        return False


def _is_allowed_function(node: exp.Func) -> bool:
    """sqlglot models many operators (AND, OR, ...) as Func too; those are fine."""
    return type(node) in _ACCEPTED


def _describe(node: exp.Expression) -> str:
    """A short human name for a node: the operator or keyword, not sqlglot's class."""
    names = {exp.DPipe: "operator ||", exp.Mod: "operator %", exp.Alias: "an alias (AS)",
             exp.NullSafeEQ: "IS NOT DISTINCT FROM", exp.NullSafeNEQ: "IS DISTINCT FROM",
             exp.Escape: "LIKE ... ESCAPE", exp.Any: "ANY", exp.All: "ALL", exp.Star: "*",
             exp.Dot: "field access (.)", exp.Bracket: "subscript [...]"}
    if type(node) in names:
        return names[type(node)]
    if type(node) in (exp.HexString, exp.ByteString, exp.National, exp.BitString, exp.RawString):
        return "this kind of string literal (use a plain 'string')"
    return f"{node.key.upper()} ({node.sql(dialect='postgres')[:40]!r})"


def _identifier_name(ident: exp.Expression) -> str:
    """PostgreSQL folds unquoted identifiers to lower case; quoted ones are exact."""
    if isinstance(ident, exp.Identifier):
        return ident.this if ident.quoted else ident.this.lower()
    return ident.name.lower()


def _number(text: str, fail: Callable[[str], FilterError]) -> int | Decimal:
    """A numeric literal as a Python value, so it is emitted as a bound literal."""
    if re.fullmatch(r"\d+", text):
        return int(text)
    if re.fullmatch(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", text):
        return Decimal(text)
    raise fail(f"unsupported number {text!r}")


def _cast_type_name(to: exp.Expression, fail: Callable[[str], FilterError]) -> str:
    """The format_type-style name for a CAST target, if it is a plain scalar type."""
    if not isinstance(to, exp.DataType) or to.this not in _CAST_TYPES:
        raise fail(f"CAST to {to.sql(dialect='postgres')} is not allowed "
                   f"(plain scalar types only, e.g. integer, numeric, text, date)")
    if to.this == exp.DataType.Type.INTERVAL and to.expressions:
        raise fail("CAST to an interval with fields is not allowed")
    mods = []
    for param in to.expressions:
        value = param.this if isinstance(param, exp.DataTypeParam) else param
        if not (isinstance(value, exp.Literal) and re.fullmatch(r"\d+", value.this or "")):
            raise fail(f"CAST to {to.sql(dialect='postgres')} is not allowed")
        mods.append(value.this)
    if len(mods) > 2:
        raise fail(f"CAST to {to.sql(dialect='postgres')} is not allowed")
    name = _CAST_TYPES[to.this] + (f"({','.join(mods)})" if mods else "")
    return name + _ZONED.get(to.this, "")


# ---------------------------------------------------------------------------
# Types as SQL
# ---------------------------------------------------------------------------

def _sql_type(type_name: str) -> sql.Composable:
    """Render a format_type() name as SQL that can follow ``::`` safely.

    Quoted names are unquoted and re-quoted by psycopg; unquoted names must
    stay unquoted (``integer`` is a keyword alias, the type is ``int4``, and
    ``"char"`` is not ``char``), so they pass only if every piece matches the
    strict grammar in :data:`_TYPE_NAME`.  Arrays are refused: ``->>`` gives
    their JSON text, which is not PostgreSQL's array syntax.
    """
    m = _TYPE_NAME.fullmatch(type_name)
    if m is None:
        raise ValueError(f"unsupported column type for a filter: {type_name!r}")
    parts = []
    if m["schema"]:
        parts += [_sql_ident(m["schema"]), sql.SQL(".")]
    parts.append(_sql_ident(m["base"]))
    if m["mod"]:
        parts.append(sql.SQL(m["mod"]))
    if m["zone"]:
        parts.append(sql.SQL(m["zone"]))
    return sql.Composed(parts)


def _without_typmod(type_name: str) -> str:
    """The type to cast a parameter to: the column's type without its modifier.

    An explicit cast to ``character varying(40)`` truncates and one to
    ``numeric(14,3)`` rounds, so '1.0004' would match 1.000; without the
    modifier the value is compared as given.  ``character`` and ``bit``
    without a length mean length 1, hence their unbounded relatives.
    """
    m = _TYPE_NAME.fullmatch(type_name)
    if m is None:
        return type_name
    base = {"character": "bpchar", "bit": "bit varying"}.get(m["base"], m["base"])
    schema = f"{m['schema']}." if m["schema"] else ""
    return f"{schema}{base}{m['zone'] or ''}"


def _sql_ident(piece: str) -> sql.Composable:
    if piece.startswith('"'):
        return sql.Identifier(piece[1:-1].replace('""', '"'))
    return sql.SQL(piece)  # lowercase word(s) checked by _TYPE_NAME


def jsonb_column(row_expr: sql.Composable,
                 columns: Mapping[str, str]) -> Callable[[str], sql.Composable]:
    """Column expressions over a ``jsonb`` row image, for the change stream.

    ``to_jsonb(row)`` keeps every value's text form, so
    ``(row ->> 'name')::<type>`` gives back the column's value with its own
    type and the filter compares exactly as it does on the table itself.
    """
    def column(name: str) -> sql.Composable:
        if name not in columns:
            raise KeyError(f"no column {name!r} in the row image")
        return sql.SQL("(({}) ->> {})::{}").format(row_expr, sql.Literal(name),
                                                  _sql_type(columns[name]))
    return column


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def render(flt: RowFilter, params: Mapping[str, object],
           column: Callable[[str], sql.Composable]) -> sql.Composable:
    """Build the predicate as psycopg ``sql`` pieces from the validated AST.

    ``column(name)`` supplies the SQL for a column in the caller's context.
    Parameter values (strings from the CLI, e.g. ``"42"``) are bound as
    literals; where the other side is a column or a CAST, the value is cast
    to that type (``'42'::integer``) so it compares as the column does.
    A placeholder without a value is a :class:`FilterError`.
    """
    missing = sorted(flt.params - set(params))
    if missing:
        names = ", ".join(f":{n}" for n in missing)
        have = ", ".join(sorted(params)) or "none"
        raise FilterError(flt.table, flt.text,
                          f"no value for parameter {names} (this branch has: {have})")
    values = {name: _param_text(flt, name, params[name]) for name in flt.params}
    return _Renderer(flt, lambda name, cast_to: _cast(sql.Literal(values[name]), cast_to), column).node(flt.tree)


# Column types whose text form is equal exactly when their values are (the route's
# premise), as format_type prints them without a modifier, and the type a branch's
# parameter is cast to for its route.
ROUTE_TYPES = {"smallint": "int2", "integer": "int4", "bigint": "int8", "text": "text",
               "character varying": "text", "uuid": "uuid"}


def route_of(flt: RowFilter) -> tuple[str, str, str] | None:
    """The (column, parameter, ROUTE_TYPES type) of a ``column = :parameter`` that the whole
    filter requires (one of its top-level ANDs), on a column of a ROUTE_TYPES type; None if
    there is none.

    A row can pass such a filter only for a branch whose parameter, cast to the column's
    type, has the text the row's column has: capture writes that text into the log row
    (its route) and a branch's probe and window look only at its own routes and at rows
    without one (migration 012), instead of evaluating the filter on every store's rows.
    """
    def conjuncts(n: exp.Expression):
        while type(n) is exp.Paren:
            n = n.this
        if type(n) is exp.And:
            yield from conjuncts(n.this)
            yield from conjuncts(n.expression)
        else:
            yield n

    for n in conjuncts(flt.tree):
        if type(n) is not exp.EQ:
            continue
        sides = [n.this, n.expression]
        while any(type(s) is exp.Paren for s in sides):
            sides = [s.this if type(s) is exp.Paren else s for s in sides]
        kinds = [type(s) for s in sides]
        if sorted(k.__name__ for k in kinds) != ["Column", "Placeholder"]:
            continue
        column = _identifier_name(sides[kinds.index(exp.Column)].this)
        param = sides[kinds.index(exp.Placeholder)].this
        kind = ROUTE_TYPES.get(_without_typmod(flt.column_types.get(column, "")))
        if kind:
            return column, param, kind
    return None


def render_for_any_branch(flt: RowFilter, column: Callable[[str], sql.Composable]) -> sql.Composable:
    """The predicate with each parameter looked up on HQ for the session's own branch
    (migration 007's replication.branch_param), for the row restrictions HQ enforces on
    every branch login with one definition: a login without the parameter reads no row."""
    def lookup(name: str, cast_to: str | None) -> sql.Composable:
        return _cast(sql.SQL("(SELECT replication.branch_param({}))").format(sql.Literal(name)), cast_to)
    return _Renderer(flt, lookup, column).node(flt.tree)


def _cast(value: sql.Composable, cast_to: str | None) -> sql.Composable:
    if cast_to is None:
        return value
    return sql.SQL("CAST({} AS {})").format(value, _sql_type(_without_typmod(cast_to)))


def _param_text(flt: RowFilter, name: str, value: object) -> str:
    """Parameter values travel as text and are cast by the server, like CLI input."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float, Decimal)):
        return str(value)
    what = "no value (null)" if value is None else f"a {type(value).__name__} value"
    raise FilterError(flt.table, flt.text, f"parameter :{name} has {what}")


class _Renderer:
    """Turns a validated AST into fully parenthesized SQL."""

    def __init__(self, flt: RowFilter, param: Callable[[str, str | None], sql.Composable],
                 column: Callable[[str], sql.Composable]):
        self.flt, self.param, self.column = flt, param, column

    def node(self, n: exp.Expression, cast_to: str | None = None) -> sql.Composable:
        kind = type(n)
        if kind is exp.Paren:
            return self.node(n.this, cast_to)
        if kind is exp.Placeholder:
            return self.placeholder(n.this, cast_to)
        if kind in _COMPARISONS or kind in _PATTERNS:
            return self.compare(n)
        if kind in _CONNECTIVES:
            return self.binary(n, _CONNECTIVES[kind])
        if kind in _ARITHMETIC:
            return self.binary(n, _ARITHMETIC[kind])
        if kind is exp.Not:
            return sql.SQL("(NOT {})").format(self.node(n.this))
        if kind is exp.Neg:  # the space keeps "- -1" from becoming a "--" comment
            return sql.SQL("(- {})").format(self.node(n.this, cast_to))
        if kind is exp.Is:
            return self.is_(n)
        if kind is exp.Between:
            typed = self.type_of(n.this)
            return sql.SQL("({} BETWEEN {} AND {})").format(
                self.node(n.this), self.node(n.args["low"], typed),
                self.node(n.args["high"], typed))
        if kind is exp.In:
            typed = self.type_of(n.this)
            items = sql.SQL(", ").join(self.node(i, typed) for i in n.expressions)
            return sql.SQL("({} IN ({}))").format(self.node(n.this), items)
        if kind is exp.Cast:
            return sql.SQL("CAST({} AS {})").format(self.node(n.this),
                                                    _sql_type(self.cast_type(n)))
        if kind is exp.Column:
            return self.column(_identifier_name(n.this))
        if kind is exp.Literal:
            if n.is_string:
                return sql.Literal(n.this)
            return sql.Literal(_number(n.this, self.fail))
        if kind is exp.Boolean:
            return sql.SQL("TRUE" if n.this else "FALSE")
        if kind is exp.Null:
            return sql.SQL("NULL")
        return self.function(n)

    def function(self, n: exp.Expression) -> sql.Composable:
        kind = type(n)
        if kind in _UNARY_FUNCTIONS:
            return sql.SQL(_UNARY_FUNCTIONS[kind] + "({})").format(self.node(n.this))
        if kind is exp.Coalesce:
            args = sql.SQL(", ").join(self.node(a) for a in [n.this, *n.expressions])
            return sql.SQL("coalesce({})").format(args)
        if kind is exp.Round:
            args = [self.node(n.this)]
            if n.args.get("decimals") is not None:
                args.append(self.node(n.args["decimals"]))
            return sql.SQL("round({})").format(sql.SQL(", ").join(args))
        if kind is exp.Substring:
            parts = [self.node(n.this)]
            if n.args.get("start") is not None:
                parts += [sql.SQL(" FROM "), self.node(n.args["start"])]
            if n.args.get("length") is not None:
                parts += [sql.SQL(" FOR "), self.node(n.args["length"])]
            return sql.SQL("substring({})").format(sql.Composed(parts))
        # parse_filter never lets anything else through; refuse rather than guess.
        raise self.fail(f"{_describe(n)} is not allowed in a filter")

    def compare(self, n: exp.Expression) -> sql.Composable:
        """``a OP b``, casting a placeholder to the type of the other side."""
        op = _COMPARISONS.get(type(n)) or _PATTERNS[type(n)]
        if type(n) in _PATTERNS and n.args.get("negate"):
            op = "NOT " + op
        left = self.node(n.this, self.type_of(n.expression))
        right = self.node(n.expression, self.type_of(n.this))
        return sql.SQL("({} " + op + " {})").format(left, right)

    def binary(self, n: exp.Expression, op: str) -> sql.Composable:
        return sql.SQL("({} " + op + " {})").format(self.node(n.this), self.node(n.expression))

    def is_(self, n: exp.Is) -> sql.Composable:
        rhs = "NULL" if type(n.expression) is exp.Null else (
            "TRUE" if n.expression.this else "FALSE")
        neg = "NOT " if n.args.get("negate") else ""
        return sql.SQL("({} IS " + neg + rhs + ")").format(self.node(n.this))

    def placeholder(self, name: str, cast_to: str | None) -> sql.Composable:
        return self.param(name, cast_to)

    def type_of(self, n: exp.Expression) -> str | None:
        """The known PostgreSQL type of a column or CAST; None for anything else."""
        if type(n) is exp.Paren:
            return self.type_of(n.this)
        if type(n) is exp.Column:
            return self.flt.column_types.get(_identifier_name(n.this))
        if type(n) is exp.Cast:
            return self.cast_type(n)
        return None

    def cast_type(self, n: exp.Cast) -> str:
        return _cast_type_name(n.to, self.fail)

    def fail(self, reason: str) -> FilterError:
        return FilterError(self.flt.table, self.flt.text, reason)
