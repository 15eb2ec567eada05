"""The create journal: what a process has changed but not yet committed.

A mount on SQLite commits its creates, renames, attribute changes and new
subpools in batches (see ``Database.batched`` and ``service.batch``) and
answers each before its batch commits. Each is appended here first, one line
of JSON (a create has no ``op``; the others name theirs), so a process killed
before the commit loses none of them: the next start (or ``fsck``) replays
the journal of a holder that is gone, in order, and its backing files become
media again. The journal is emptied after every batch commit, so it holds
only the changes in flight.

Like SQLite's own log with ``synchronous=NORMAL``, it survives the death of
the process (it is in the page cache) but not a power cut: a file that must
survive one is ``fsync``ed, which commits the batch first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from velocityfs.store.backing import make_dirs

JOURNAL_DIR = Path("media") / ".journal"


def journal_dir(top: Path) -> Path:
    return top / JOURNAL_DIR


class CreateJournal:
    """One process's journal, open for appending."""

    def __init__(self, top: Path, holder_id: str) -> None:
        directory = journal_dir(top)
        make_dirs(directory)
        self.path = directory / holder_id
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def append(self, record: dict[str, Any]) -> None:
        """Record one create; a line is written whole, in one ``write``."""
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        if os.write(self._fd, line) != len(line):
            raise OSError(f"short write to the create journal {self.path}")

    def clear(self) -> None:
        """Forget every create recorded so far: their batch has committed."""
        os.ftruncate(self._fd, 0)

    def close(self, *, keep: bool = False) -> None:
        """Close the journal and delete it (a clean stop, after the last commit), or
        ``keep`` it for the next start to replay."""
        os.close(self._fd)
        if not keep:
            self.path.unlink(missing_ok=True)


def journals(top: Path) -> list[str]:
    """The holder ids that have a journal under the store top."""
    directory = journal_dir(top)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_file() and p.name[0] != ".")


def read_journal(top: Path, holder_id: str) -> list[dict[str, Any]]:
    """The creates a journal records; a torn last line (a crash mid-write) is skipped."""
    records = []
    try:
        data = (journal_dir(top) / holder_id).read_bytes()
    except FileNotFoundError:
        return []
    for line in data.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def keep_journal(top: Path, holder_id: str, records: list[dict[str, Any]]) -> None:
    """Replace a gone process's journal with the records that must wait (creates on an
    offline volume), written whole before it takes the old one's place."""
    path = journal_dir(top) / holder_id
    spare = path.with_name(f".{holder_id}.tmp")
    spare.write_bytes(
        b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)
    )
    os.replace(spare, path)


def discard_journal(top: Path, holder_id: str) -> None:
    (journal_dir(top) / holder_id).unlink(missing_ok=True)
