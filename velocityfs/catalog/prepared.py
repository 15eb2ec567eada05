"""Core statements compiled once and run on the driver's cursor.

A create pays one catalog transaction of five short statements. SQLite runs
each in 2-7 us; SQLAlchemy's execution of a compiled, cached Core statement
(execution context, events, result object) costs about 20 us on top, so the
library, not the database, was most of what a create cost. ``Prepared`` keeps
what SQLAlchemy is for here (the statement is still built with Core and
compiled by the connection's own dialect; the engine still owns the
connection and its transaction) and leaves out only the per-call machinery.

What that machinery did for these statements is done here too, or refused
when the statement is prepared, never skipped quietly:

- Python-side column defaults and ``onupdate`` values (``changed_ns``, which
  is how other mounts learn of a change) are computed on every execution;
- bind processors are applied; statements whose results would need result
  processors, or that use expanding or literal-execute parameters, are
  refused;
- a driver error is raised as SQLAlchemy's ``DBAPIError``, and a lost
  connection is invalidated, as ``Connection.execute`` would.
"""

import functools
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Dialect
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler


class NotPreparable(Exception):
    """A statement needs execution machinery that ``Prepared`` does not provide."""


@dataclass(frozen=True)
class _Form:
    """One statement as one dialect runs it."""

    sql: str
    required: frozenset[str]
    positions: tuple[str, ...] | None
    fixed: dict[str, Any]
    defaults: tuple[tuple[str, Callable[[], Any]], ...]
    processors: dict[str, Callable[[Any], Any]]


class Prepared:
    """A Core statement, compiled once per dialect, executed on the DBAPI cursor."""

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._forms: weakref.WeakKeyDictionary[Dialect, _Form] = weakref.WeakKeyDictionary()

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> DBAPICursor:
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
        for key, process in form.processors.items():
            values[key] = process(values[key])
        args: Any = values if form.positions is None else [values[k] for k in form.positions]
        dbapi_connection = conn.connection.dbapi_connection
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(form.sql, args)
        except dialect.loaded_dbapi.Error as exc:
            lost = dialect.is_disconnect(exc, dbapi_connection, cursor)
            if lost:
                conn.invalidate(exc)
            raise DBAPIError.instance(
                form.sql, args, exc, dialect.loaded_dbapi.Error, connection_invalidated=lost
            ) from exc
        return cursor


def _prepare(statement: Executable, dialect: Dialect) -> _Form:
    compiled = statement.compile(dialect=dialect)
    if not isinstance(compiled, SQLCompiler):
        raise NotPreparable(f"not a SQL statement: {statement}")
    if compiled.post_compile_params or compiled.literal_execute_params:
        raise NotPreparable(f"expanding or literal-execute parameters: {compiled.string}")
    if compiled.escaped_bind_names:
        raise NotPreparable(f"bind names the dialect escapes: {compiled.string}")
    for column in compiled._result_columns:
        if column.type._cached_result_processor(dialect, None) is not None:  # noqa: SLF001
            raise NotPreparable(f"result column {column.keyname} needs processing")
    if any(bind.callable is not None for bind in compiled.bind_names):
        raise NotPreparable(f"a bind parameter's value is computed per call: {compiled.string}")
    required = frozenset(name for bind, name in compiled.bind_names.items() if bind.required)
    fixed = {
        name: bind.effective_value
        for bind, name in compiled.bind_names.items()
        if not bind.required
    }
    defaults = []
    prefetch = [(c, c.default) for c in compiled.insert_prefetch]
    prefetch += [(c, c.onupdate) for c in compiled.update_prefetch]
    for column, generator in prefetch:
        if generator is None or not (generator.is_callable or generator.is_scalar):
            raise NotPreparable(f"column {column.key} has a default run in SQL")
        arg = generator.arg  # type: ignore[attr-defined]
        make = functools.partial(arg, None) if generator.is_callable else _constant(arg)
        defaults.append((column.key, make))
    required = required.difference(key for key, _make in defaults)
    processors = dict(compiled._bind_processors)  # noqa: SLF001
    return _Form(
        sql=compiled.string,
        required=required,
        positions=tuple(compiled.positiontup) if compiled.positional else None,
        fixed=fixed,
        defaults=tuple(defaults),
        processors=processors,
    )


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value
