"""Backing files on disk: the bytes of each media, named by media id.

Volume DEFAULT is the store's top directory and volume NAME lives at
``TOP/vol/NAME``, as in Koji; a media's file is ``<volume>/media/<2 hex>/<mid>``
so renames and moves between pools never touch the disk.
"""

import os
from pathlib import Path

from velocityfs.catalog.models import DEFAULT_VOLUME


class BackingStore:
    """Paths and file lifecycle of backing files under one store top."""

    def __init__(self, top: str | os.PathLike[str]) -> None:
        self.top = Path(top).resolve()

    def volume_dir(self, volume: str) -> Path:
        if volume == DEFAULT_VOLUME:
            return self.top
        return self.top / "vol" / volume

    def path(self, volume: str, media_id: str) -> Path:
        return self.volume_dir(volume) / "media" / media_id[:2] / media_id

    def ensure_layout(self) -> None:
        """Create the store top and its DEFAULT ``media/`` directory."""
        (self.top / "media").mkdir(parents=True, exist_ok=True)

    def create(self, volume: str, media_id: str, size: int = 0) -> Path:
        """Create an empty (sparse) backing file of ``size`` bytes; refuse to reuse one."""
        path = self.path(volume, media_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return path

    def upload_path(self, volume: str, holder_id: str, media_id: str) -> Path:
        """Where an upload streams before it is complete: beside the final file, same disk.

        Each process uploads into a directory of its own, so the leftovers of a
        crashed one can be removed without touching another's uploads.
        """
        return self.volume_dir(volume) / "media" / ".uploads" / holder_id / media_id

    def discard_uploads(self, holder_id: str) -> None:
        """Remove unfinished uploads of a (dead or retiring) holder on every volume."""
        dirs = [self.top / "media" / ".uploads" / holder_id]
        dirs += (self.top / "vol").glob(f"*/media/.uploads/{holder_id}")
        for directory in dirs:
            if directory.is_dir():
                for leftover in directory.iterdir():
                    leftover.unlink(missing_ok=True)
                directory.rmdir()

    def remove(self, volume: str, media_id: str) -> None:
        self.path(volume, media_id).unlink(missing_ok=True)

    def size(self, volume: str, media_id: str) -> int | None:
        """The backing file's apparent size, or None when it is missing."""
        try:
            return self.path(volume, media_id).stat().st_size
        except FileNotFoundError:
            return None
