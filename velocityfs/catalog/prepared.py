"""Core statements compiled once and run on the driver's cursor.

A create pays one catalog transaction of five short statements (read the pool
chain, check the name, charge the chain, insert the media and the grant).
SQLAlchemy's execution of a compiled, cached Core statement (execution context,
events, result object) costs several times what the driver and the database do
for it: measured here: 17 us against 79 us per statement, SQLite, SQLAlchemy
2.1.9 (``Prepared`` against ``Connection.execute``, the five statements' mean,
CPU time), some 300 us of a mount's create, which costs about 500 us with it.
So the library, not the database, was most of what a create cost. ``Prepared``
keeps what SQLAlchemy is for here (the statement is still built with Core and
compiled by the connection's own dialect; the engine still owns the
connection and its transaction) and leaves out only the per-call machinery.

What that machinery did for these statements is done here too, or refused
when the statement is prepared, never skipped quietly:

- Python-side column defaults and ``onupdate`` values (``changed_ns``, which
  is how other mounts learn of a change) are computed on every execution; a
  default that reads the execution context raises ``NotPreparable`` (there is
  none); a default SQLAlchemy would run in SQL before the statement (a sequence,
  an expression) is refused;
- bind processors are applied; statements whose results would need result
  processors, or that use expanding or literal-execute parameters, bind values
  computed per call, bind names the dialect escapes or a driver that is given
  bind types through ``setinputsizes``, are refused;
- a connection not in a transaction begins one, as it would on its own;
- a driver error is raised as SQLAlchemy's ``DBAPIError``, and a lost
  connection is invalidated, as ``Connection.execute`` would.

Only SQLAlchemy's public API is used (documented attributes of ``SQLCompiler``,
``BindParameter``, ``TypeEngine``, ``ColumnDefault`` and ``Dialect``), so that
a minor release cannot quietly change what a create does.
"""

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, cast

from sqlalchemy import (
    ColumnDefault,
    Connection,
    Dialect,
    Executable,
    SelectBase,
    TupleType,
    UpdateBase,
)
from sqlalchemy.engine import BindTyping
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.exc import DBAPIError, ResourceClosedError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeEngine


class NotPreparable(Exception):
    """A statement needs execution machinery that ``Prepared`` does not provide."""


class Cursor(DBAPICursor, Protocol):
    """The driver's cursor a statement ran on: PEP 249's, and iterable over its rows
    (sqlite3's and psycopg's are)."""

    def __iter__(self) -> Iterator[Any]: ...


@dataclass(frozen=True, slots=True)
class _Form:
    """One statement as one dialect runs it."""

    sql: str
    required: frozenset[str]
    positions: tuple[str, ...] | None
    fixed: dict[str, Any]
    defaults: tuple[tuple[str, Callable[[], Any]], ...]
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]


class Prepared:
    """A Core statement, compiled once per dialect, executed on the DBAPI cursor."""

    def __init__(self, statement: Executable) -> None:
        """``statement``: a SELECT (or UNION...), INSERT, UPDATE or DELETE."""
        self.statement = statement
        self._forms: weakref.WeakKeyDictionary[Dialect, _Form] = weakref.WeakKeyDictionary()

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> Cursor:
        """Run the statement in ``conn``'s transaction; returns the driver's cursor."""
        dialect = conn.dialect
        form = self._forms.get(dialect)
        if form is None:
            form = self._forms[dialect] = _prepare(self.statement, dialect)
        if not form.required.issubset(params):
            missing = ", ".join(sorted(form.required.difference(params)))
            raise KeyError(f"no value for {missing} in {form.sql}")
        values = {**form.fixed, **params}
        for key, make in form.defaults:
            if key not in params:
                values[key] = make()
        for key, process in form.processors:
            values[key] = process(values[key])
        args: Any = values if form.positions is None else [values[k] for k in form.positions]
        if not conn.in_transaction():
            conn.begin()  # Connection.execute's autobegin (SQLite's BEGIN IMMEDIATE is ours)
        pooled = conn.connection
        dbapi_connection = pooled.dbapi_connection
        if dbapi_connection is None:
            raise ResourceClosedError("the connection's DBAPI connection is gone")
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(form.sql, args)
        except dialect.loaded_dbapi.Error as exc:
            lost = dialect.is_disconnect(exc, pooled, cursor)
            if lost:
                conn.invalidate(exc)
            else:
                with contextlib.suppress(Exception):
                    cursor.close()
            raise DBAPIError.instance(
                form.sql,
                args,
                exc,
                dialect.loaded_dbapi.Error,
                hide_parameters=conn.engine.hide_parameters,
                connection_invalidated=lost,
                dialect=dialect,
            ) from exc
        return cast(Cursor, cursor)


def _prepare(statement: Executable, dialect: Dialect) -> _Form:
    if not isinstance(statement, SelectBase | UpdateBase):
        raise NotPreparable(f"not a SELECT, INSERT, UPDATE or DELETE: {statement!r}")
    compiled = statement.compile(dialect=dialect)
    if not isinstance(compiled, SQLCompiler):
        raise NotPreparable(f"not a SQL statement: {statement}")
    if dialect.bind_typing is BindTyping.SETINPUTSIZES:
        raise NotPreparable(f"{dialect.name} is given bind types through setinputsizes")
    if compiled.post_compile_params or compiled.literal_execute_params:
        raise NotPreparable(f"expanding or literal-execute parameters: {compiled.string}")
    if compiled.escaped_bind_names:
        raise NotPreparable(f"bind names the dialect escapes: {compiled.string}")
    for column in _result_columns(statement, compiled):
        if _needs_result_processing(column.type, dialect):
            raise NotPreparable(f"result column {column} needs processing: {compiled.string}")

    binds = compiled.bind_names
    if any(bind.callable is not None for bind in binds):
        raise NotPreparable(f"a bind parameter's value is computed per call: {compiled.string}")
    processors = []
    for bind, name in binds.items():
        if isinstance(bind.type, TupleType):
            raise NotPreparable(f"tuple-typed bind parameter {name}: {compiled.string}")
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors.append((name, process))
    required = frozenset(name for bind, name in binds.items() if bind.required)
    fixed = {name: bind.effective_value for bind, name in binds.items() if not bind.required}

    names = set(binds.values())
    defaults = []
    prefetch = [(c, c.default) for c in compiled.insert_prefetch]
    prefetch += [(c, c.onupdate) for c in compiled.update_prefetch]
    for column, generator in prefetch:
        if column.key not in names:
            raise NotPreparable(f"column {column.key} is not bound under its key")
        if not isinstance(generator, ColumnDefault):
            raise NotPreparable(f"column {column.key} has a default run in SQL")
        make: Callable[[], Any]
        if generator.is_callable:
            make = functools.partial(generator.arg, _NO_CONTEXT)
        elif generator.is_scalar:
            make = _constant(generator.arg)
        else:
            raise NotPreparable(f"column {column.key} has a default run in SQL")
        defaults.append((column.key, make))

    positions = None
    if dialect.positional:
        if compiled.positiontup is None:
            raise NotPreparable(f"no parameter order for {compiled.string}")
        positions = tuple(compiled.positiontup)
    return _Form(
        sql=compiled.string,
        required=required.difference(key for key, _make in defaults),
        positions=positions,
        fixed=fixed,
        defaults=tuple(defaults),
        processors=tuple(processors),
    )


def _result_columns(
    statement: SelectBase | UpdateBase, compiled: SQLCompiler
) -> Sequence[ColumnElement[Any]]:
    """The typed columns of the statement's rows: what it selects or returns."""
    if isinstance(statement, SelectBase):
        return list(statement.selected_columns)
    return compiled.effective_returning or ()


def _needs_result_processing(type_: TypeEngine[Any], dialect: Dialect) -> bool:
    """Whether SQLAlchemy would convert this type's values as rows are fetched.

    Asked without a DBAPI type code (SQLite's cursors never report one): a type
    whose processing depends on it (PostgreSQL's numerics) raises, and is refused.
    """
    try:
        return type_.dialect_impl(dialect).result_processor(dialect, None) is not None
    except Exception:
        return True


class _NoContext:
    """Stands in for the ``ExecutionContext`` a default's callable may take: there is none."""

    def __getattr__(self, name: str) -> NoReturn:
        raise NotPreparable(f"a column default reads the execution context ({name})")


_NO_CONTEXT = _NoContext()


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value
