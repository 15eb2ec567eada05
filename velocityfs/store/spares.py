"""Empty backing files made ahead of time: a create renames one into place.

Making a file costs the kernel 25-800 us of CPU on these disks (inode
allocation, under the directory's lock; the figure moves with the
filesystem's state), and a create paid it while its client waited. A thread
of its own keeps up to ``TARGET`` empty files ready on each volume a create
asked for, named by fresh media ids, in ``media/.spare/<holder>/<n>`` on that
volume; a create renames one into its bucket (about 10 us), so the work
moves to the host's second core. Spares are made ``CHUNK`` to a directory
and handed out only once their directory is full: a rename out of the
directory the thread is filling would wait for that directory's lock.
When none is ready the create makes its file itself, as before.

Spares belong to their process: a clean stop deletes them, and those of a
process that died go at the next start or with ``fsck``, like its uploads
(``BackingStore.discard_spares``).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
from pathlib import Path

from velocityfs.catalog.models import new_id
from velocityfs.store.backing import FILE_MODE, BackingStore

log = logging.getLogger(__name__)

TARGET = 512
LOW = 256
CHUNK = 64


class SpareFiles:
    """One process's spare backing files, per volume, made by a thread."""

    def __init__(self, backing: BackingStore, holder_id: str) -> None:
        self.backing = backing
        self.holder_id = holder_id
        # Volume -> (file, media id) of the spares ready there. deque: taken on one
        # thread, filled on another.
        self._ready: dict[str, collections.deque[tuple[str, str]]] = {}
        self._refills = itertools.count()
        self._wanted = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._fill, name="velocityfs spares", daemon=True)
        self._thread.start()

    def take(self, volume: str) -> str | None:
        """A media id whose empty file is now at its final path on ``volume``, or None
        when no spare is ready (the first ask for a volume starts keeping spares there)."""
        ready = self._ready.get(volume)
        if ready is None:
            self._want(volume)
            return None
        try:
            spare, media_id = ready.popleft()
        except IndexError:
            spare = media_id = ""
        if len(ready) < LOW:
            self._want(volume)
        if not spare:
            return None
        final = self.backing.path(volume, media_id)
        try:
            os.rename(spare, final)
        except FileNotFoundError:
            if not os.path.exists(spare):
                return None  # its volume went away under us
            self.backing.make_media_dirs(volume, final.parent)
            os.rename(spare, final)
        return media_id

    def close(self) -> None:
        """Stop the thread and delete the spares left."""
        with self._wanted:
            self._stopped = True
            self._wanted.notify()
        self._thread.join()
        self.backing.discard_spares(self.holder_id)

    def _want(self, volume: str) -> None:
        with self._wanted:
            self._ready.setdefault(volume, collections.deque())
            self._wanted.notify()

    def _fill(self) -> None:
        while True:
            with self._wanted:
                while not self._stopped and not self._short():
                    self._wanted.wait()
                if self._stopped:
                    return
                short = [(v, ready) for v, ready in self._ready.items() if len(ready) < LOW]
            for volume, ready in short:
                try:
                    self._make(volume, ready)
                except OSError as exc:
                    log.warning("cannot keep spare files on volume %s: %s", volume, exc)
                    with self._wanted:
                        self._ready.pop(volume, None)

    def _short(self) -> bool:
        return any(len(ready) < LOW for ready in self._ready.values())

    def _make(self, volume: str, ready: collections.deque[tuple[str, str]]) -> None:
        """Fill ``ready`` up to ``TARGET``, ``CHUNK`` files to a new directory, each
        chunk handed out once whole; directories already emptied go."""
        home = self.backing.spare_dir(volume, self.holder_id)
        for emptied in home.glob("*"):
            with contextlib.suppress(OSError):  # not empty: spares are still in it
                emptied.rmdir()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        while len(ready) < TARGET and not self._stopped:
            directory = home / str(next(self._refills))
            self.backing.make_media_dirs(volume, directory)
            chunk = []
            for media_id in (new_id() for _ in range(CHUNK)):
                spare = f"{directory}/{media_id}"
                os.close(os.open(spare, flags, FILE_MODE))  # as BackingStore.create
                chunk.append((spare, media_id))
            ready.extend(chunk)


def spare_dirs(top: Path) -> list[Path]:
    """Every process's spare directory, on every volume under the store top."""
    return [*top.glob("media/.spare/*"), *top.glob("vol/*/media/.spare/*")]
