"""Small helpers shared by the mount tests (tests/test_fs_*.py)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 1 << 20
VX = "user.velocity."

Cli = Callable[..., subprocess.CompletedProcess[str]]


def run(*cmd: str | os.PathLike[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a tool that must succeed; a failure shows its command and output."""
    res = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert res.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited with {res.returncode}\n"
        f"--- stdout ---\n{res.stdout}--- stderr ---\n{res.stderr}"
    )
    return res


class Catalog:
    """The service, in the test process, on a test's catalog and store.

    Used to set up (init, root pools) and to read what the catalog records,
    without the second a CLI start-up costs; tests that must see the CLI's
    answer use ``pool_show``.
    """

    def __init__(self, catalog_url: str, store_dir: str | os.PathLike[str]) -> None:
        from velocityfs.service.velocity import Velocity

        self.v = Velocity(catalog_url, store_dir)

    def setup(self, root_pools: dict[str, int]) -> None:
        """What ``velocityfs init`` and ``pool create NAME --quota-mib Q`` do."""
        self.v.init()
        for name, quota_mib in root_pools.items():
            self.v.pools.create(None, name, quota_mib * MIB)

    def pool(self, ref: str) -> dict[str, Any]:
        """The fields of ``pool show --json`` that the mount tests compare."""
        p = self.v.pool_by_ref(ref)
        return {
            "pid": p.id,
            "quota_bytes": p.quota_bytes,
            "used_bytes": p.used_bytes,
            "avail_bytes": self.v.pools.available(p.id),
            "media": self.v.pools.media_count(p.id),
        }

    def used(self, ref: str) -> int:
        return self.v.pool_by_ref(ref).used_bytes

    def exists(self, ref: str) -> bool:
        from velocityfs.errors import NotFound

        try:
            self.v.pool_by_ref(ref)
        except NotFound:
            return False
        return True

    def close(self) -> None:
        self.v.close()


def pool_show(cli: Cli, ref: str) -> dict[str, Any]:
    """``velocityfs pool show REF --json``, parsed."""
    return json.loads(cli("pool", "show", ref, "--json", check=True).stdout)


def vattr(path: str | os.PathLike[str], key: str) -> str:
    """A ``user.velocity.KEY`` attribute read with os.getxattr."""
    return os.getxattr(path, VX + key).decode()


def sync_dir(path: str | os.PathLike[str]) -> None:
    """fsync on a pool: the mount commits the closes and unlinks it batches (fs.grants),
    so the catalog read next by another process is exact."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def used(path: str | os.PathLike[str]) -> int:
    return int(vattr(path, "used_bytes"))


def avail(path: str | os.PathLike[str]) -> int:
    return int(vattr(path, "avail_bytes"))


def getfattr(path: str | os.PathLike[str], name: str) -> str:
    """One attribute's value as the getfattr tool prints it (``--only-values``)."""
    return run("getfattr", "--only-values", "-n", name, path).stdout


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def manifest(root: str | os.PathLike[str], *, meta: bool = True) -> dict[str, tuple]:
    """Every entry below ``root`` by relative path: kind, size, sha256 and, with
    ``meta``, permission bits, owner and mtime (ns). The root itself is left out."""
    root = Path(root)
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISDIR(st.st_mode):
                entry: tuple = ("dir",)
            else:
                assert stat.S_ISREG(st.st_mode), f"{p} is neither a file nor a directory"
                entry = ("file", st.st_size, sha256(p))
            if meta:
                entry += (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
            found[rel] = entry
    return found


def file_sizes(root: str | os.PathLike[str]) -> int:
    """Sum of the apparent sizes of every file below ``root``."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
