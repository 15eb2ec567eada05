"""faultfs: a passthrough FUSE filesystem that fails chosen operations on demand.

A stand-in for a failing disk (this kernel has no device-mapper, so no
dm-error or dm-flakey): it mirrors the directory SOURCE at MOUNTPOINT and
answers a chosen errno for chosen operations on chosen paths::

    python tests/support/faultfs.py SOURCE MOUNTPOINT --control CONTROL.json

The control file holds the faults, e.g.
``{"rules": [{"op": "read", "errno": "EIO", "path": "media/*"}]}``: ``op`` is a
handler name (read, write, fsync, flush, create, open, ...; a glob, so ``*`` is
every operation), ``errno`` a name from the errno module and ``path`` a glob on
the path relative to SOURCE (``*`` matches ``/`` too; without ``path``: every
path). It is read again whenever it changes (checked on every operation), so a
test switches faults at run time by replacing it (``FaultyVolume`` below does
that atomically). A missing or empty file means no faults. A matching operation
fails before it touches SOURCE, so the file stays as it was (``release`` closes
its descriptor first: the kernel ignores its answer anyway). Every injected
fault is logged as ``faultfs: fault OP PATH: ERRNO``.

Open files are opened with ``direct_io``: every read and write reaches this
process, with no page cache between its client and the fault. No handler lets
an exception escape (that would end the FUSE session): OSError becomes its
errno, anything else EIO. Prints ``faultfs: mounted ...`` once mounted;
SIGTERM, SIGINT or ``fusermount3 -u`` unmount it cleanly (exit status 0).

The test side: ``FaultyVolume`` runs it as a subprocess through
``support.mount.Mount`` and writes the control file.
"""

from __future__ import annotations

import argparse
import errno
import fnmatch
import functools
import json
import os
import signal
import stat
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from velocityfs.store.space import fallocate  # fallocate(2) with its modes, through ctypes

READY_LINE = "faultfs: mounted"

# -- the filesystem -----------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"faultfs: {msg}", file=sys.stderr, flush=True)


def guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
    """No exception may escape a pyfuse3 handler: it would end the whole session."""

    @functools.wraps(handler)
    async def wrapper(self: FaultFS, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log(f"{handler.__name__} failed:\n{traceback.format_exc()}")
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class Faults:
    """The rules of the control file, read again whenever the file changes."""

    def __init__(self, control: str) -> None:
        self.control = control
        self.seen: tuple[int, int, int] | None = None
        self.rules: list[tuple[str, int, str | None]] = []

    def check(self, op: str, rel: str) -> None:
        self._reload()
        for pattern, code, path in self.rules:
            if fnmatch.fnmatchcase(op, pattern) and (
                path is None or fnmatch.fnmatchcase(rel, path)
            ):
                log(f"fault {op} {rel}: {errno.errorcode[code]}")
                raise pyfuse3.FUSEError(code)

    def _reload(self) -> None:
        try:
            st = os.stat(self.control)
        except FileNotFoundError:
            self.seen, self.rules = None, []
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self.seen:
            return
        self.seen = key
        try:
            text = Path(self.control).read_text()
            raw = json.loads(text)["rules"] if text.strip() else []
            self.rules = [(r["op"], getattr(errno, r["errno"]), r.get("path")) for r in raw]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log(f"ignoring unreadable control file {self.control}: {exc!r}")
            self.rules = []
            return
        log(f"rules: {raw}")


class FaultFS(pyfuse3.Operations):
    """SOURCE mirrored, with inode numbers of its own (the source's may be reused)."""

    enable_writeback_cache = False

    def __init__(self, source: str, control: str) -> None:
        super().__init__()
        self.source = os.path.realpath(source)
        self.faults = Faults(control)
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: self.source}  # our inode -> path
        self.inos: dict[int, int] = {os.lstat(self.source).st_ino: pyfuse3.ROOT_INODE}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.open_files: dict[int, int] = {}  # fd (our file handle) -> our inode
        self.dirs: dict[int, tuple[str, list[str]]] = {}  # opendir's fh -> path, names
        self.next_dir = 1

    # -- paths and attributes ------------------------------------------------------------

    def path(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def child(self, parent: int, name: bytes) -> str:
        return os.path.join(self.path(parent), os.fsdecode(name))

    def fault(self, op: str, path: str) -> None:
        self.faults.check(op, os.path.relpath(path, self.source))

    def fault_fh(self, op: str, fh: int) -> None:
        self.fault(op, self.paths.get(self.open_files.get(fh, -1), self.source))

    def stat_of(self, ino: int) -> os.stat_result:
        """The inode's attributes; from an open descriptor once its name is gone."""
        try:
            st = os.lstat(self.path(ino))
            if self.inos.get(st.st_ino) == ino:
                return st
        except FileNotFoundError:
            pass
        for fd, open_ino in self.open_files.items():
            if open_ino == ino:
                return os.fstat(fd)
        raise pyfuse3.FUSEError(errno.ENOENT)

    def entry(self, path: str) -> pyfuse3.EntryAttributes:
        """Attributes of ``path``, giving it an inode number of ours if it has none yet."""
        st = os.lstat(path)
        ino = self.inos.get(st.st_ino)
        if ino is None:
            ino = self.inos[st.st_ino] = self.next_ino
            self.next_ino += 1
        self.paths[ino] = path
        return self.attrs(st, ino)

    @staticmethod
    def attrs(st: os.stat_result, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = 0  # SOURCE is only changed through us, but stay exact anyway
        a.attr_timeout = 0
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size"):
            setattr(a, field, getattr(st, field))
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return a

    def gone(self, st: os.stat_result) -> None:
        """A name was removed: a later file reusing its inode number gets a new one of ours
        (the kernel would otherwise see an inode change type under the same number)."""
        if stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1:
            self.inos.pop(st.st_ino, None)

    # -- names and attributes ------------------------------------------------------------

    @guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        path = self.child(parent_inode, name)
        self.fault("lookup", path)
        if name == b".":
            path = self.path(parent_inode)
        elif name == b"..":
            path = os.path.dirname(self.path(parent_inode))
            if parent_inode == pyfuse3.ROOT_INODE:
                path = self.source
        return self.entry(path)

    @guarded
    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        self.fault("getattr", self.path(inode))
        return self.attrs(self.stat_of(inode), inode)

    @guarded
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        path = self.path(inode)
        self.fault("setattr", path)
        target: int | str = path if fh is None else fh
        if fields.update_size:
            os.truncate(target, attr.st_size)
        if fields.update_mode:
            os.chmod(target, attr.st_mode & 0o7777)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(target, uid, gid)
        if fields.update_atime or fields.update_mtime:
            st = self.stat_of(inode)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(target, ns=(atime, mtime))
        return self.attrs(self.stat_of(inode), inode)

    @guarded
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        path = self.path(inode)
        self.fault("readlink", path)
        return os.fsencode(os.readlink(path))

    @guarded
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        self.fault("statfs", self.source)
        st = os.statvfs(self.source)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files"):
            setattr(out, field, getattr(st, field))
        out.f_ffree, out.f_favail, out.f_namemax = st.f_ffree, st.f_favail, st.f_namemax
        return out

    # -- directories ---------------------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: Any) -> int:
        path = self.path(inode)
        self.fault("opendir", path)
        fh = self.next_dir
        self.next_dir += 1
        self.dirs[fh] = (path, sorted(os.listdir(path)))  # a snapshot, stable while it changes
        return fh

    @guarded
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        path, names = self.dirs[fh]
        self.fault("readdir", path)
        for index in range(start_id, len(names)):
            try:
                attrs = self.entry(os.path.join(path, names[index]))
            except FileNotFoundError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), attrs, index + 1):
                break

    @guarded
    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    @guarded
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        path = self.child(parent_inode, name)
        self.fault("mkdir", path)
        os.mkdir(path, mode & ~ctx.umask)
        return self.entry(path)

    @guarded
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self.child(parent_inode, name)
        self.fault("rmdir", path)
        st = os.lstat(path)
        os.rmdir(path)
        self.gone(st)

    @guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self.child(parent_inode, name)
        self.fault("unlink", path)
        st = os.lstat(path)
        os.unlink(path)
        self.gone(st)

    @guarded
    async def rename(
        self,
        parent_old: int,
        name_old: bytes,
        parent_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        old, new = self.child(parent_old, name_old), self.child(parent_new, name_new)
        self.fault("rename", old)
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_NOREPLACE/EXCHANGE: not needed
        moved = os.lstat(old)
        try:
            replaced: os.stat_result | None = os.lstat(new)
        except FileNotFoundError:
            replaced = None
        os.rename(old, new)
        if replaced is not None and replaced.st_ino != moved.st_ino:
            self.gone(replaced)
        for ino, path in list(self.paths.items()):  # the renamed entry and, for a directory,
            if path == old or path.startswith(old + "/"):  # everything below it
                self.paths[ino] = new + path[len(old) :]

    # -- files ---------------------------------------------------------------------------

    def _file_info(self, fd: int, ino: int) -> pyfuse3.FileInfo:
        self.open_files[fd] = ino
        return pyfuse3.FileInfo(fh=fd, direct_io=True, keep_cache=False)

    @guarded
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        path = self.child(parent_inode, name)
        self.fault("create", path)
        fd = os.open(path, (flags & ~os.O_APPEND) | os.O_CREAT | os.O_CLOEXEC, mode & ~ctx.umask)
        try:
            attrs = self.entry(path)
        except BaseException:
            os.close(fd)
            raise
        return self._file_info(fd, attrs.st_ino), attrs

    @guarded
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        path = self.path(inode)
        self.fault("open", path)
        # O_APPEND off: pwrite must write at the offsets the kernel gives.
        fd = os.open(path, (flags & ~(os.O_APPEND | os.O_CREAT | os.O_EXCL)) | os.O_CLOEXEC)
        return self._file_info(fd, inode)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.fault_fh("read", fh)
        return os.pread(fh, size, off)

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.fault_fh("write", fh)
        return os.pwrite(fh, buf, off)

    @guarded
    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        self.fault_fh("fallocate", fh)
        fallocate(fh, mode, off, length)

    @guarded
    async def flush(self, fh: int) -> None:
        self.fault_fh("flush", fh)

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        self.fault_fh("fsync", fh)
        (os.fdatasync if datasync else os.fsync)(fh)

    @guarded
    async def release(self, fh: int) -> None:
        ino = self.open_files.pop(fh, None)
        os.close(fh)
        self.fault("release", self.paths.get(ino or -1, self.source))

    # -- extended attributes ---------------------------------------------------------------

    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        path = self.path(inode)
        self.fault("getxattr", path)
        return os.getxattr(path, name, follow_symlinks=False)

    @guarded
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        path = self.path(inode)
        self.fault("setxattr", path)
        os.setxattr(path, name, value, follow_symlinks=False)

    @guarded
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        path = self.path(inode)
        self.fault("listxattr", path)
        return [os.fsencode(n) for n in os.listxattr(path, follow_symlinks=False)]

    @guarded
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        path = self.path(inode)
        self.fault("removexattr", path)
        os.removexattr(path, name, follow_symlinks=False)


async def _serve() -> None:
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log(f"signal {signum}: unmounting")
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--control", required=True, help="the JSON file of fault rules")
    args = parser.parse_args(argv)
    ops = FaultFS(args.source, args.control)
    pyfuse3.init(ops, args.mountpoint, {"fsname=faultfs", "subtype=faultfs", "default_permissions"})
    try:
        log(f"mounted {ops.source} on {args.mountpoint}")
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    log("unmounted")
    return 0


# -- the test side -----------------------------------------------------------------------


class FaultyVolume:
    """faultfs over ``source``, mounted on ``mountpoint`` (``STORE/vol/NAME``), with its
    faults switched by ``fail``/``clear``; ``mount`` is the support.mount.Mount."""

    def __init__(self, source: Path, mountpoint: Path, control: Path, log_path: Path) -> None:
        from support.mount import Mount

        self.source = Path(source)
        self.source.mkdir(parents=True, exist_ok=True)
        self.control = Path(control)
        self.clear()
        cmd = [sys.executable, __file__, str(self.source), str(mountpoint)]
        self.mount = Mount(
            [*cmd, "--control", str(self.control)], mountpoint, log_path, ready_line=READY_LINE
        )

    @property
    def path(self) -> Path:
        return self.mount.path

    def set_rules(self, rules: list[dict[str, str]]) -> None:
        """Replace every rule at once (atomically: faultfs never reads half a file)."""
        for rule in rules:
            assert set(rule) <= {"op", "errno", "path"} and "op" in rule, rule
            assert isinstance(getattr(errno, rule["errno"], None), int), rule
        tmp = self.control.with_name(self.control.name + ".tmp")
        tmp.write_text(json.dumps({"rules": rules}))
        os.replace(tmp, self.control)

    def fail(self, op: str, code: str, path: str | None = None) -> None:
        """From now on ``op`` on ``path`` (a glob relative to the volume) fails with ``code``."""
        self.set_rules([{"op": op, "errno": code} | ({} if path is None else {"path": path})])

    def clear(self) -> None:
        self.set_rules([])

    def injected(self, op: str = "*") -> int:
        """How many faults faultfs injected so far (into ``op``, a glob)."""
        lines = [
            ln.split() for ln in self.mount.log.splitlines() if ln.startswith("faultfs: fault ")
        ]
        return sum(1 for parts in lines if fnmatch.fnmatchcase(parts[2], op))

    def media(self, mid: str) -> Path:
        """A media's backing file as it lies on the disk, bypassing faultfs."""
        return self.source / "media" / mid[:2] / mid


if __name__ == "__main__":
    sys.exit(main())
