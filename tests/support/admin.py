"""Helpers for the operator tests (tests/test_volumes.py, tests/test_ops.py).

- ``InProcessCli``: the ``velocityfs`` command run through click in this process
  (a spawned CLI costs ~0.6 s; these tests run a few hundred commands).
- ``Tmpfs``: small tmpfs disks mounted inside a test store, unmounted afterwards.
- files with known contents, checksums, and a look at a store's volume layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from velocityfs.cli.context import Context
from velocityfs.cli.main import main as velocityfs_main
from velocityfs.service.velocity import Velocity

MIB = 1 << 20
# The CLI reads these from the environment; a test says everything on the command line.
_NO_ENV = {"VELOCITYFS_CONFIG": None, "VELOCITYFS_CATALOG": None, "VELOCITYFS_STORE": None}


@dataclass
class CliResult:
    """What one CLI call did: exit status, stdout, stderr (the CLI's one-line errors)."""

    args: list[str]
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return (
            f"velocityfs {' '.join(self.args)} exited with {self.code}\n"
            f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )


class InProcessCli:
    """Run ``velocityfs [--config C] --catalog URL --store DIR ARGS...`` through click.

    Every Velocity the commands open is closed after each call (engines must not
    pile up connections on the PostgreSQL server). ``catalog``/``store`` may be
    None to leave them to the configuration file.
    """

    def __init__(self, catalog: str | None, store: str | os.PathLike[str] | None) -> None:
        self.catalog = catalog
        self.store = None if store is None else str(store)
        self.opened: list[Any] = []

    def track(self, monkeypatch: Any) -> InProcessCli:
        original = Context.velocity
        opened = self.opened

        def velocity(ctx: Context, *, initialised: bool = True) -> Any:
            v = original(ctx, initialised=initialised)
            if all(v is not o for o in opened):
                opened.append(v)
            return v

        monkeypatch.setattr(Context, "velocity", velocity)
        return self

    def __call__(
        self,
        *args: str | os.PathLike[str],
        check: bool = True,
        config: str | os.PathLike[str] | None = None,
        catalog: str | None = None,
        store: str | os.PathLike[str] | None = None,
        flags: bool = True,
    ) -> CliResult:
        argv: list[str] = []
        if config is not None:
            argv += ["--config", str(config)]
        if flags:
            cat = catalog or self.catalog
            top = store or self.store
            if cat is not None:
                argv += ["--catalog", cat]
            if top is not None:
                argv += ["--store", str(top)]
        argv += [str(a) for a in args]
        try:
            result = CliRunner().invoke(velocityfs_main, argv, catch_exceptions=True, env=_NO_ENV)
        finally:
            while self.opened:
                self.opened.pop().close()
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"velocityfs {' '.join(argv)} crashed") from result.exception
        res = CliResult(argv, result.exit_code, result.stdout, result.stderr)
        if check:
            assert res.code == 0, str(res)
        return res


def velocityfs_argv(catalog: str, store: str | os.PathLike[str], *args: str) -> list[str]:
    """A real ``velocityfs`` process's command line (for what must be a separate process)."""
    return [sys.executable, "-m", "velocityfs", "--catalog", catalog, "--store", str(store), *args]


# -- disks -------------------------------------------------------------------------------


def mountinfo_has(path: str | os.PathLike[str]) -> bool:
    """Is anything mounted on ``path`` (resolved), read from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


class Tmpfs:
    """Small tmpfs disks for a test (a volume whose disk fills before a quota does)."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def __call__(self, path: str | os.PathLike[str], size: str) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert res.returncode == 0, f"cannot mount a tmpfs on {path}: {res.stderr}"
        self.mounted.append(path)
        return path

    def cleanup(self) -> None:
        for path in reversed(self.mounted):
            for attempt in (["umount", str(path)], ["umount", "-l", str(path)]):
                if not mountinfo_has(path):
                    break
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    subprocess.run(attempt, capture_output=True, timeout=30, check=False)
        self.mounted.clear()


# -- file contents -----------------------------------------------------------------------


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ at every MiB (a misplaced or lost block shows)."""
    block = hashlib.sha256(f"velocityfs-{seed}".encode()).digest() * (MIB // 32)
    out = bytearray()
    n = 0
    while len(out) < size:
        out += n.to_bytes(8, "little") + block[8:]
        n += 1
    return bytes(out[:size])


def sha256_of(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fill(path: str | os.PathLike[str], size: int, seed: int = 0) -> str:
    """Write ``size`` bytes of ``pattern`` over a file in place; return their sha256."""
    data = pattern(size, seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        offset = 0
        while offset < size:
            offset += os.pwrite(fd, view[offset : offset + 8 * MIB], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return sha256_bytes(data)


# -- the store's layout ------------------------------------------------------------------


def volume_file(store: str | os.PathLike[str], volume: str, mid: str) -> Path:
    """Where a media's bytes live on a volume (DEFAULT: the store top)."""
    top = Path(store) if volume == "DEFAULT" else Path(store) / "vol" / volume
    return top / "media" / mid[:2] / mid


def default_path(store: str | os.PathLike[str], mid: str) -> Path:
    return volume_file(store, "DEFAULT", mid)


def copies_of(store: str | os.PathLike[str], mid: str) -> dict[str, str]:
    """Every entry that names ``mid`` below the store: relative path -> 'file'/'link'/...

    Staging leftovers (``<mid>.moving``, ``<mid>.link``) count too.
    """
    top = Path(store)
    found = {}
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            if name.startswith(mid):
                p = Path(dirpath) / name
                kind = "link" if p.is_symlink() else "file"
                found[str(p.relative_to(top))] = kind
    return found


def write_config(path: str | os.PathLike[str], **values: Any) -> Path:
    """A TOML configuration file from keyword values (strings, numbers, booleans)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value}")
        elif "\n" in value:
            lines.append(f'{key} = """\n{value}\n"""')
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def service(catalog_url: str, store: Path, policy: str | None = None) -> Iterator[Velocity]:
    """The service layer on a test store, closed afterwards."""
    kwargs = {} if policy is None else {"volume_policy": policy}
    v = Velocity(catalog_url, store, **kwargs)
    try:
        yield v
    finally:
        v.close()
