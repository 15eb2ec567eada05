"""A writer process's batch on SQLite: its journaled units of work and what waits for
its commit.

A mount on SQLite runs the catalog changes its clients wait for (creates, renames,
attribute changes, new subpools) as units of one open write transaction
(``Database.batched``) and answers before it commits. Each such unit appends its
record to the process's journal (``store.journal``) as its last step, so a process
killed before the commit loses none of them: they are replayed at the next start
(``MediaService.recover_journal``). PostgreSQL catalogs, and processes that do not
batch, run every unit as a transaction of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection

from velocityfs.catalog.database import Database
from velocityfs.store.backing import BackingStore
from velocityfs.store.journal import CreateJournal


class WriteBatch:
    """The owner of one process's journal."""

    def __init__(self, database: Database, backing: BackingStore) -> None:
        self.db = database
        self._backing = backing
        self._journal: CreateJournal | None = None
        database.on_batch_commit(self._committed)

    def start(self, holder_id: str) -> None:
        """Batch from now on (SQLite only), journaling as ``holder_id``."""
        self.end()
        if self.db.is_sqlite:
            self._journal = CreateJournal(self._backing.top, holder_id)
            self.db.batching = True

    def end(self) -> None:
        """Commit the last batch and delete the journal, unless a batch was lost (the
        next start replays it)."""
        if self._journal is not None:
            self.db.commit_batch()
            self.db.batching = False
            self._journal.close(keep=self.db.batch_lost)
            self._journal = None

    @property
    def active(self) -> bool:
        return self._journal is not None

    def open(self) -> bool:
        """Have a batch open for the next unit, without waiting for SQLite's lock; False
        when it is another process's now, or this process does not batch."""
        return self._journal is not None and self.db.open_batch()

    @contextmanager
    def unit(self, *, batched: bool) -> Iterator[tuple[Connection, CreateJournal | None]]:
        """A unit of work, ``batched`` (when this process batches and may now) or a
        transaction of its own; with the journal its record goes to, if batched."""
        journal = self._journal if batched and self.db.may_batch() else None
        with self.db.batched() if journal else self.db.statements() as conn:
            yield conn, journal

    def _committed(self) -> None:
        if self._journal is not None:
            self._journal.clear()
