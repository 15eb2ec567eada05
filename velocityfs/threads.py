"""Run blocking service calls off the trio loop, through one shared limiter.

SQLAlchemy here is synchronous; an inline call that waits on a lock would
freeze every FUSE and HTTP request served by the loop (``in_batch`` runs one
inline only while its process holds the lock already). The mount and the
in-process API share one limiter, so SQLite sees a single writer thread
(which gave the best tail latency) while PostgreSQL may use a few.

While the catalog is unreachable a call is retried, with back-off, for at
most ``catalog_timeout_s``; then the error goes to the caller (EIO in the
mount, 503 in the API). Memory-served requests never wait for it.
"""

import functools
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

import trio
from sqlalchemy.exc import DBAPIError

from velocityfs.catalog.database import Database

log = logging.getLogger(__name__)

T = TypeVar("T")


class CatalogUnavailable(Exception):
    """The catalog did not answer within the configured time."""


# SQLite's primary result codes for a database file that cannot be reached: its
# disk failed or is gone. Its other OperationalErrors (a missing table, say) are
# answers, not outages, and waiting would not change them.
_SQLITE_AWAY = frozenset({sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN})


def _is_connection_error(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    if isinstance(exc.orig, sqlite3.Error):
        return exc.orig.sqlite_errorcode & 0xFF in _SQLITE_AWAY
    name = type(exc.orig).__name__ if exc.orig is not None else ""
    return name in ("OperationalError", "InterfaceError") and "locked" not in str(exc.orig)


class Offload:
    """Awaitable access to blocking callables, at most ``threads`` at a time."""

    def __init__(self, threads: int = 1, catalog_timeout_s: float = 10.0) -> None:
        self.limiter = trio.CapacityLimiter(threads)
        self.catalog_timeout_s = catalog_timeout_s

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(fn, *args, **kwargs)
        deadline = time.monotonic() + self.catalog_timeout_s
        delay = 0.1
        while True:
            try:
                return await trio.to_thread.run_sync(call, limiter=self.limiter)
            except DBAPIError as exc:
                if not _is_connection_error(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise CatalogUnavailable(f"catalog unreachable: {exc.orig}") from exc
                log.warning("catalog unreachable (%s); retrying", exc.orig)
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def in_batch(
        self, open_batch: Callable[[], bool], fn: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        """Run a unit of work of a batch transaction right here, on the loop, when
        ``open_batch()`` has one open without waiting; otherwise (SQLite's write
        lock is another process's, or a catalog call is in flight) as ``__call__``.

        While the batch is open this process holds SQLite's write lock, so the
        call cannot wait for a lock: what it costs is its statements (and, for a
        create, a rename), less than the thread hop it saves (two wake-ups and a
        GIL hand-over, 0.1-0.25 ms here, more when the loop is busy). Taking the
        limiter without an await means no catalog thread runs meanwhile, and so
        nothing commits the batch under it.
        """
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            return await self(fn, *args, **kwargs)
        try:
            if open_batch():
                return fn(*args, **kwargs)
        finally:
            self.limiter.release()
        return await self(fn, *args, **kwargs)


def threads_for(is_sqlite: bool) -> int:
    return 1 if is_sqlite else 4


CHECKPOINT_INTERVAL_S = 1.0


async def checkpoints(db: Database, interval_s: float = CHECKPOINT_INTERVAL_S) -> None:
    """Checkpoint SQLite's log every ``interval_s`` there were commits, on a thread of
    its own: beside the catalog thread, so no transaction waits for its fsyncs."""
    if not db.is_sqlite:
        return
    seen = db.commits
    while True:
        await trio.sleep(interval_s)
        if db.commits == seen:
            continue
        seen = db.commits
        try:
            await trio.to_thread.run_sync(db.checkpoint)
        except DBAPIError as exc:
            log.warning("catalog checkpoint failed: %s", exc.orig)
