"""Engine and transaction setup for SQLite (embedded) and PostgreSQL (shared).

Every write transaction takes the locks it needs up front: on SQLite a
``BEGIN IMMEDIATE`` (one writer at a time, no upgrade deadlocks); on
PostgreSQL the ledger takes row locks root-first.

SQLite's write-ahead log is copied back into the database file by
``checkpoint``, which the long-running processes call in the background: left
to the committing connection (every 1,000 pages by default), the two fsyncs of
a checkpoint cost every transaction 70-100 us on average here.

On SQLite a process may also keep one write transaction open and run many
short units of work in it (``batched``), committing them together: the
mount's creates, which otherwise paid a BEGIN and a COMMIT (and the log
frames of the pages they share) each. See ``Database.batched``.
"""

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Engine,
    bindparam,
    cast,
    create_engine,
    event,
    extract,
    func,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

SQLITE_BUSY_TIMEOUT_MS = 60_000
# A committing connection still checkpoints once the log has this many pages (40 MiB):
# a bound for when no background checkpoint runs, not the usual way.
SQLITE_AUTOCHECKPOINT_PAGES = 10_000

log = logging.getLogger(__name__)

# After a batch commits, units run as transactions of their own for this long (see
# ``Database.may_batch``).
BATCH_PAUSE_S = 0.005

# The catalog's clock, in nanoseconds since the epoch, as an expression: leases are
# stamped and judged by it, so hosts whose clocks disagree still agree on when a lease
# ends. PostgreSQL's clock (the transaction's start); SQLite is on this host, whose
# clock every process on it shares, read as each statement runs. Both are constants,
# so statements made with them are made once (their SQL compiled once).
POSTGRESQL_NOW_NS: ColumnElement[int] = cast(
    extract("epoch", func.now()) * 1_000_000_000, BigInteger
)
SQLITE_NOW_NS: ColumnElement[int] = bindparam("now_ns", callable_=time.time_ns, type_=BigInteger)

_begin_to_read: ContextVar[bool] = ContextVar("begin_to_read", default=False)

# Key of ``Connection.info`` for the batch's memo: a dict that lives while the batch
# is open and is emptied when one of its units fails. While the batch holds SQLite's
# write lock, rows that only its units change can be remembered there instead of
# read again (the pool chains, see service.chains); anything else that changes them
# is another unit of work, which commits the batch first.
BATCH_MEMO = "velocityfs.batch_memo"


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
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
    def _on_begin(connection: Connection) -> None:
        # Straight to the driver: through exec_driver_sql this one statement cost
        # 40 us of every transaction, as much as the rest of the statements' SQL.
        # A plain BEGIN for reads: in WAL mode a snapshot, no lock that writers wait for.
        statement = "BEGIN" if _begin_to_read.get() else "BEGIN IMMEDIATE"
        try:
            _sqlite_driver(connection.connection).execute(statement)
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
        self._batch: Connection | None = None
        # Reentrant so that a unit of the batch that starts another unit of work gets
        # an error (commit_batch), not a deadlock.
        self._batch_lock = threading.RLock()
        self._in_unit = False
        self._on_batch_commit: list[Callable[[], None]] = []
        # Set by the process that batches its writes (a mount on SQLite).
        self.batching = False
        self.batch_lost = False  # a batch failed to commit: its journal must stay
        self._batch_pause_until = 0.0
        self._batch_began = 0.0
        self._batch_units = 0
        # Told of every transaction that committed: its kind ("transaction",
        # "statements", "batch" or "read"), seconds from begin to commit, and units of
        # work (a batch's; 1 otherwise). Set once by the daemon (its metrics).
        self.observe: Callable[[str, float, int], None] | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def now_ns(self) -> ColumnElement[int]:
        """The catalog's clock, in nanoseconds since the epoch, for use in a statement
        (``SQLITE_NOW_NS`` or ``POSTGRESQL_NOW_NS``)."""
        return SQLITE_NOW_NS if self.is_sqlite else POSTGRESQL_NOW_NS

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on any exception."""
        self.commit_batch()
        began = time.perf_counter()
        with self._sessions() as session, session.begin():
            yield session
        self.commits += 1
        self._committed("transaction", began)

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A unit of work that only reads. On SQLite it takes no write lock: a long
        read (the change feed's) then never holds up the writers, nor waits for them."""
        self.commit_batch()
        token = _begin_to_read.set(True)
        began = time.perf_counter()
        try:
            with self._sessions() as session, session.begin():
                yield session
        finally:
            _begin_to_read.reset(token)
        self._committed("read", began)

    @contextmanager
    def statements(self) -> Iterator[Connection]:
        """One transaction of Core statements: commits on success, rolls back on any exception.

        For the transactions every file pays (create, settle, remove): without the
        ORM's session and unit of work one costs about a tenth (measured on SQLite:
        0.1 ms against 1-2 ms, the SQL itself being a few tens of microseconds).
        """
        self.commit_batch()
        began = time.perf_counter()
        with self.engine.begin() as conn:
            yield conn
        self.commits += 1
        self._committed("statements", began)

    def _committed(self, kind: str, began: float, units: int = 1) -> None:
        if self.observe is not None:
            self.observe(kind, time.perf_counter() - began, units)

    @contextmanager
    def batched(self) -> Iterator[Connection]:
        """One unit of work in the batch transaction, which stays open after it.

        Its statements take effect at once for this process (the batch holds
        SQLite's write lock, so what they read and check is current) and reach
        the database with the batch's ``commit_batch``. A unit that fails is
        rolled back alone, to its savepoint. Every other unit of work of this
        ``Database`` commits the batch first, whatever its thread, so nothing
        in this process ever waits for the lock its own batch holds. Other
        processes wait for the batch's commit, as for any transaction.

        SQLite only: on PostgreSQL an open batch would hold its pools' row
        locks against every other host.
        """
        if not self.is_sqlite:
            raise RuntimeError("batched units of work are for SQLite catalogs")
        with self._batch_lock:
            if self._batch is None:
                self._batch = self._begin_batch(wait=True)
            assert self._batch is not None
            driver = _sqlite_driver(self._batch.connection)
            _driver_execute(driver, "SAVEPOINT unit")
            self._in_unit = True
            try:
                yield self._batch
            except BaseException:
                self._batch.info[BATCH_MEMO].clear()
                _driver_execute(driver, "ROLLBACK TO unit")
                _driver_execute(driver, "RELEASE unit")
                raise
            finally:
                self._in_unit = False
            _driver_execute(driver, "RELEASE unit")
            self._batch_units += 1

    def open_batch(self) -> bool:
        """Open the batch if SQLite's write lock can be had without waiting and the
        pause after the last one is over; True when a batch is open. (A caller that
        must not wait, the event loop, asks this.)"""
        with self._batch_lock:
            if self._batch is None and self.may_batch():
                self._batch = self._begin_batch(wait=False)
            return self._batch is not None

    def may_batch(self) -> bool:
        """Whether a unit may go in a batch now: one is open, or ``BATCH_PAUSE_S`` have
        passed since the last one committed.

        A batch holds the write lock from its first unit to its commit. Were the
        next one opened at once, another process waiting for the lock (its busy
        handler retries every 100 ms) would find it taken nearly every time it
        looked; in the pause each unit is a transaction of its own, with the lock
        free between them.
        """
        return self._batch is not None or time.monotonic() >= self._batch_pause_until

    def _begin_batch(self, *, wait: bool) -> Connection | None:
        conn = self.engine.connect()
        driver = _sqlite_driver(conn.connection)
        try:
            if not wait:
                _driver_execute(driver, "PRAGMA busy_timeout=0")
            try:
                conn.begin()
            finally:
                if not wait:
                    _driver_execute(driver, f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        except OperationalError as exc:
            conn.close()
            busy = isinstance(exc.orig, sqlite3.OperationalError) and (
                exc.orig.sqlite_errorcode == sqlite3.SQLITE_BUSY
            )
            if busy and not wait:
                return None
            raise
        except BaseException:
            conn.close()
            raise
        conn.info[BATCH_MEMO] = {}
        self._batch_began = time.perf_counter()
        self._batch_units = 0
        return conn

    def unit(self) -> contextlib.AbstractContextManager[Connection]:
        """``batched`` in a process that batches (``batching``) when it may now, else
        ``statements``."""
        return self.batched() if self.batching and self.may_batch() else self.statements()

    @property
    def batch_open(self) -> bool:
        """Units of work are waiting in the batch transaction for ``commit_batch``."""
        return self._batch is not None

    def on_batch_commit(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` after every batch commit (a journal of the batch can go then)."""
        self._on_batch_commit.append(hook)

    def commit_batch(self) -> None:
        """Commit the batch transaction, if one is open.

        If the commit fails the batch is rolled back and the error raised. The
        hooks then never run again in this process: whatever journals the
        lost batch keeps it, and the batches after it, for the next start.
        """
        if self._batch is None:
            return
        with self._batch_lock:
            if self._in_unit:
                raise RuntimeError("a unit of work of the batch started another one")
            # Another thread may have committed it since the look above.
            conn = self._take_batch()
            if conn is None:
                return
            try:
                conn.commit()
            except BaseException:
                self.batch_lost = True
                log.error("a batch could not be committed; its journal keeps it for the next start")
                raise
            finally:
                conn.info.pop(BATCH_MEMO, None)
                conn.close()
            self.commits += 1
            self._committed("batch", self._batch_began, self._batch_units)
            self._batch_pause_until = time.monotonic() + BATCH_PAUSE_S
            if not self.batch_lost:
                for hook in self._on_batch_commit:
                    hook()

    def _take_batch(self) -> Connection | None:
        """Detach the batch connection, if any (under ``_batch_lock``)."""
        conn, self._batch = self._batch, None
        return conn

    def checkpoint(self) -> None:
        """Copy SQLite's write-ahead log into the database file, as far as readers allow.

        PASSIVE: writers go on meanwhile; its fsyncs are paid here, not by a commit.
        """
        if not self.is_sqlite:
            return
        connection = self.engine.raw_connection()
        try:
            _sqlite_driver(connection).execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            connection.close()

    def dispose(self) -> None:
        """Close the engine; a batch still open is rolled back (its journal keeps it)."""
        if self._batch is not None:
            self._batch.info.pop(BATCH_MEMO, None)
            self._batch.close()
            self._batch = None
        self.engine.dispose()


def _sqlite_driver(connection: PoolProxiedConnection) -> sqlite3.Connection:
    """The ``sqlite3`` connection under a pooled SQLite connection."""
    driver = connection.driver_connection
    if not isinstance(driver, sqlite3.Connection):
        raise TypeError(f"not an open sqlite3 connection: {driver!r}")
    return driver


def _driver_execute(driver: sqlite3.Connection, statement: str) -> None:
    try:
        driver.execute(statement)
    except sqlite3.Error as exc:
        raise OperationalError(statement, None, exc) from exc
