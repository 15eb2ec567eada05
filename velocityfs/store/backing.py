"""Backing files on disk: the bytes of each media, named by media id.

Volume DEFAULT is the store's top directory and volume NAME lives at
``TOP/vol/NAME``, as in Koji; a media's file is ``<volume>/media/<2 hex>/<mid>``
so renames and moves between pools never touch the disk.

Every backing file is ``FILE_MODE`` (0600: the daemon's user only), however it
is made: the mount decides who may open a media, by the modes it shows. Modes
are given where files and directories are made, never left to the umask,
which may be 0.
"""

import errno
import os
import shutil
from pathlib import Path

from velocityfs.catalog.models import DEFAULT_VOLUME

FILE_MODE = 0o600
DIR_MODE = 0o755


def make_dirs(path: Path) -> None:
    """``mkdir -p`` making every directory ``DIR_MODE`` (a umask can only narrow it);
    ``Path.mkdir(parents=True)`` gives the parents 0777 less the umask."""
    try:
        path.mkdir(DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
    except FileNotFoundError:
        make_dirs(path.parent)
        path.mkdir(DIR_MODE, exist_ok=True)


class BackingStore:
    """Paths and file lifecycle of backing files under one store top."""

    def __init__(self, top: str | os.PathLike[str]) -> None:
        self.top = Path(top).resolve()
        self._top = str(self.top)

    def volume_dir(self, volume: str) -> Path:
        if volume == DEFAULT_VOLUME:
            return self.top
        return self.top / "vol" / volume

    def make_media_dirs(self, volume: str, path: Path) -> None:
        """``make_dirs`` for ``path`` below a volume's ``media/``, which it never makes:
        ``volume add`` made it on the volume's disk, so while that disk is not mounted
        this fails (ENOENT) instead of putting files on the disk under its mount point."""
        media = self.volume_dir(volume) / "media"
        if not media.is_dir():
            raise FileNotFoundError(
                errno.ENOENT,
                f"volume {volume} has no media/ directory: is its disk mounted?",
                str(media),
            )
        make_dirs(path)

    def path(self, volume: str, media_id: str) -> Path:
        return self.volume_dir(volume) / "media" / media_id[:2] / media_id

    def paths_text(self, volume: str, media_id: str) -> tuple[str, str]:
        """``path`` and ``default_path`` as strings: views are built by the thousand (a
        mount's start, the change feed), and pathlib cost more than the SQL there."""
        tail = f"media/{media_id[:2]}/{media_id}"
        default = f"{self._top}/{tail}"
        if volume == DEFAULT_VOLUME:
            return default, default
        return f"{self._top}/vol/{volume}/{tail}", default

    def default_path(self, media_id: str) -> Path:
        """The media's DEFAULT path: the file itself, or a symlink to it on another volume."""
        return self.path(DEFAULT_VOLUME, media_id)

    def locate(self, media_id: str) -> tuple[str, Path]:
        """Where the bytes really are now, read off the DEFAULT path: (volume, path)."""
        real = Path(os.path.realpath(self.default_path(media_id)))
        try:
            parts = real.relative_to(self.top / "vol").parts
        except ValueError:
            return DEFAULT_VOLUME, real
        return parts[0], real

    def moving_path(self, volume: str, media_id: str) -> Path:
        """Where a move stages its copy on the target volume until the switch."""
        return self.path(volume, media_id).with_suffix(".moving")

    def point_default(self, volume: str, media_id: str) -> None:
        """Make the DEFAULT path a relative symlink to the media on ``volume`` (atomically).

        As in Koji, for compatibility: whoever knows only the DEFAULT layout
        still finds the bytes. Nothing to do for media on DEFAULT itself.
        """
        if volume == DEFAULT_VOLUME:
            return
        link = self.default_path(media_id)
        target = os.path.relpath(self.path(volume, media_id), link.parent)
        try:
            # New media (every create): nothing to replace, so no staging and rename.
            os.symlink(target, link)
            return
        except FileNotFoundError:
            make_dirs(link.parent)
        except FileExistsError:
            pass
        staging = link.with_suffix(".link")
        staging.unlink(missing_ok=True)
        os.symlink(target, staging)
        os.rename(staging, link)

    def ensure_layout(self) -> None:
        """Create the store top and its DEFAULT ``media/`` directory."""
        make_dirs(self.top / "media")

    def create(self, volume: str, media_id: str, size: int = 0) -> Path:
        """Create an empty (sparse) backing file of ``size`` bytes; refuse to reuse one."""
        path = self.path(volume, media_id)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(path, flags, FILE_MODE)
        except FileNotFoundError:  # the first media of its 2-hex bucket
            self.make_media_dirs(volume, path.parent)
            fd = os.open(path, flags, FILE_MODE)
        try:
            if size:
                os.ftruncate(fd, size)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self.point_default(volume, media_id)
        return path

    def upload_path(self, volume: str, holder_id: str, media_id: str) -> Path:
        """Where an upload streams before it is complete: beside the final file, same disk.

        Each process uploads into a directory of its own, so the leftovers of a
        crashed one can be removed without touching another's uploads.
        """
        return self.volume_dir(volume) / "media" / ".uploads" / holder_id / media_id

    def adopt_spare(self, volume: str, media_id: str, size: int = 0) -> None:
        """Finish a spare file (see store.spares) for new media, as ``create`` would."""
        if size:
            os.truncate(self.path(volume, media_id), size)
        self.point_default(volume, media_id)

    def spare_dir(self, volume: str, holder_id: str) -> Path:
        """Where a process keeps empty files ready for creates (see store.spares)."""
        return self.volume_dir(volume) / "media" / ".spare" / holder_id

    def discard_uploads(self, holder_id: str) -> None:
        """Remove unfinished uploads of a (dead or retiring) holder on every volume."""
        self._discard(".uploads", holder_id)

    def discard_spares(self, holder_id: str) -> None:
        """Remove the spare files of a (dead or retiring) holder on every volume."""
        self._discard(".spare", holder_id)

    def _discard(self, kind: str, holder_id: str) -> None:
        dirs = [self.top / "media" / kind / holder_id]
        dirs += (self.top / "vol").glob(f"*/media/{kind}/{holder_id}")
        for directory in dirs:
            if directory.is_dir():
                shutil.rmtree(directory)

    def remove(self, volume: str, media_id: str) -> None:
        self.path(volume, media_id).unlink(missing_ok=True)
        self.default_path(media_id).unlink(missing_ok=True)

    def size(self, volume: str, media_id: str) -> int | None:
        """The backing file's apparent size, or None when it is missing."""
        try:
            return self.path(volume, media_id).stat().st_size
        except FileNotFoundError:
            return None
