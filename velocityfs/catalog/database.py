"""Engine and transaction setup for SQLite (embedded) and PostgreSQL (shared).

Every write transaction takes the locks it needs up front: on SQLite a
``BEGIN IMMEDIATE`` (one writer at a time, no upgrade deadlocks); on
PostgreSQL the ledger takes row locks root-first.

SQLite's write-ahead log is copied back into the database file by
``checkpoint``, which the long-running processes call in the background: left
to the committing connection (every 1,000 pages by default), the two fsyncs of
a checkpoint cost every transaction 70-100 us on average here.
"""

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 60_000
# A committing connection still checkpoints once the log has this many pages (40 MiB):
# a bound for when no background checkpoint runs, not the usual way.
SQLITE_AUTOCHECKPOINT_PAGES = 10_000

_begin_to_read: ContextVar[bool] = ContextVar("begin_to_read", default=False)


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        # Take transaction control from the driver so that BEGIN IMMEDIATE is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_AUTOCHECKPOINT_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:  # type: ignore[no-untyped-def]
        # Straight to the driver: through exec_driver_sql this one statement cost
        # 40 us of every transaction, as much as the rest of the statements' SQL.
        # A plain BEGIN for reads: in WAL mode a snapshot, no lock that writers wait for.
        statement = "BEGIN" if _begin_to_read.get() else "BEGIN IMMEDIATE"
        try:
            connection.connection.driver_connection.execute(statement)
        except sqlite3.Error as exc:
            raise OperationalError(statement, None, exc) from exc


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the per-dialect settings the ledger relies on."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _tune_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)


class Database:
    """An engine plus a session factory; one per process and catalog URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.commits = 0

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on any exception."""
        with self._sessions() as session, session.begin():
            yield session
        self.commits += 1

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A unit of work that only reads. On SQLite it takes no write lock: a long
        read (the change feed's) then never holds up the writers, nor waits for them."""
        token = _begin_to_read.set(True)
        try:
            with self._sessions() as session, session.begin():
                yield session
        finally:
            _begin_to_read.reset(token)

    @contextmanager
    def statements(self) -> Iterator[Connection]:
        """One transaction of Core statements: commits on success, rolls back on any exception.

        For the transactions every file pays (create, settle, remove): without the
        ORM's session and unit of work one costs about a tenth (measured on SQLite:
        0.1 ms against 1-2 ms, the SQL itself being a few tens of microseconds).
        """
        with self.engine.begin() as conn:
            yield conn
        self.commits += 1

    def checkpoint(self) -> None:
        """Copy SQLite's write-ahead log into the database file, as far as readers allow.

        PASSIVE: writers go on meanwhile; its fsyncs are paid here, not by a commit.
        """
        if not self.is_sqlite:
            return
        connection = self.engine.raw_connection()
        try:
            connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            connection.close()

    def dispose(self) -> None:
        self.engine.dispose()
