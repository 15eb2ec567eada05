"""A private PostgreSQL server for one test: started, stopped, restarted, always removed.

tests/test_multihost.py stops the catalog's server under a running mount, which the
session's shared server (scripts/test) must not suffer. Built the way scripts/test
builds that one: initdb into a directory under /tmp owned by the ``postgres`` user
(the server refuses to run as root), trust authentication on 127.0.0.1 only, a free
port, and no durability (fsync=off).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PG_USER = "postgres"


def _pg_bin() -> Path:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) if x.isdigit() else x for x in p.parent.name.split(".")],
    )
    if not found or not (found[-1] / "initdb").exists():
        raise RuntimeError("no PostgreSQL binaries in /usr/lib/postgresql/*/bin")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    """One throwaway server; ``close()`` stops it and deletes its files (idempotent)."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.port = _free_port()
        # /tmp, not pytest's tmp_path: the postgres user must be able to reach it, and
        # the socket path must stay short.
        self.top = Path(tempfile.mkdtemp(prefix="velocityfs-pg-", dir="/tmp"))
        self.data = self.top / "data"
        self.sock = self.top / "sock"
        self.log = self.top / "server.log"
        self.sock.mkdir()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            pw = pwd.getpwnam(PG_USER)
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
            for path in (self.top, self.sock):
                os.chown(path, self._uid, self._gid)

    # -- running PostgreSQL programs ---------------------------------------------------

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited with {res.returncode}:\n{res.stdout}{res.stderr}\n"
                f"--- {self.log} ---\n{self.server_log()}"
            )
        return res

    def _write(self, path: Path, text: str, append: bool = False) -> None:
        with open(path, "a" if append else "w", encoding="utf-8") as f:
            f.write(text)
        if self._as_root:
            os.chown(path, self._uid, self._gid)

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle -----------------------------------------------------------------------

    def init(self) -> PrivatePostgres:
        """initdb and start; returns self."""
        self._run(
            "initdb", "-D", str(self.data), "-U", PG_USER, "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        self._write(
            self.data / "pg_hba.conf",
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        self._write(
            self.data / "postgresql.conf",
            f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
            f"unix_socket_directories = '{self.sock}'\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            "max_connections = 100\n",
            append=True,
        )
        self.start()
        return self

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this server (psycopg 3 driver)."""
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create ``name`` and return its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        admin = f"postgresql://{PG_USER}@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def close(self) -> None:
        """Stop the server (immediately) if it runs and delete every file; never raises."""
        try:
            if self.running:
                with contextlib.suppress(Exception):
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.top, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self.init()

    def __exit__(self, *exc: object) -> None:
        self.close()
