"""A mount on the embedded SQLite catalog, which other processes write too.

The mount checkpoints the write-ahead log in the background (no commit pays
for the fsyncs). What must hold: while another process (the CLI, a separate
API server) holds the write lock, the mount's transactions wait off its event
loop, so everything it answers from memory still gets answered, and the change
feed mounts poll is read without waiting; and the catalog file itself soon has
every commit.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from support.fs import sync_dir

pytestmark = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)

LIVENESS_S = 10.0  # how long an answer from memory may take on a loaded CI machine


def sqlite_path(catalog_url: str) -> Path:
    return Path(catalog_url.removeprefix("sqlite:///"))


def in_thread(fn) -> tuple[threading.Thread, list]:  # type: ignore[no-untyped-def]
    """Run ``fn`` in a thread; the list gets its result or exception."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_a_create_waits_for_another_writer_and_the_mount_answers_meanwhile(
    catalog, mount, catalog_url
):
    catalog.setup({"tenants": 64, "other": 64})
    m = mount()
    (m / "other" / "seed.img").write_bytes(b"s" * 8192)
    sync_dir(m / "other")

    writer = sqlite3.connect(sqlite_path(catalog_url), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process holds SQLite's write lock
    try:
        create, created = in_thread(lambda: (m / "tenants" / "new.img").write_bytes(b"n" * 100))
        create.join(0.5)
        assert create.is_alive(), f"the create did not wait for the write lock: {created}"

        # Reads, listings, stats and writes into an open file's grant need no catalog.
        def from_memory() -> bytes:
            data = (m / "other" / "seed.img").read_bytes()
            assert sorted(p.name for p in (m / "other").iterdir()) == ["seed.img"]
            assert (m / "tenants").stat().st_mode
            return data

        reader, read = in_thread(from_memory)
        reader.join(LIVENESS_S)
        assert not reader.is_alive(), "the mount froze while the create waited"
        assert read == [b"s" * 8192]
        assert create.is_alive()
    finally:
        writer.execute("COMMIT")
        writer.close()
    create.join(LIVENESS_S)
    assert not create.is_alive() and created == [100]
    assert (m / "tenants" / "new.img").read_bytes() == b"n" * 100
    sync_dir(m / "tenants")
    assert catalog.used("tenants") == 100


def test_the_catalog_file_is_checkpointed_in_the_background(catalog, mount, catalog_url, tmp_path):
    """Commits reach the database file, not only its log, without another commit."""
    catalog.setup({"tenants": 64})
    m = mount()
    for i in range(20):
        (m / "tenants" / f"f{i}.img").write_bytes(b"x" * 1000)
    sync_dir(m / "tenants")

    def media_in_file_alone() -> int:
        copy = tmp_path / "copy.sqlite"  # the file without its -wal: what a checkpoint wrote
        shutil.copyfile(sqlite_path(catalog_url), copy)
        try:
            with sqlite3.connect(copy) as db:
                return db.execute("SELECT count(*) FROM media").fetchone()[0]
        except sqlite3.DatabaseError:  # copied in the middle of a checkpoint
            return -1
        finally:
            for leftover in tmp_path.glob("copy.sqlite*"):
                leftover.unlink()

    for _ in range(100):
        if media_in_file_alone() == 20:
            return
        threading.Event().wait(0.1)
    pytest.fail(f"the catalog file has {media_in_file_alone()} of 20 media after 10 s")


def test_the_change_feed_reads_while_another_process_writes(catalog, catalog_url):
    """Mounts poll the feed every attribute timeout: it must neither wait for a writer
    nor hold the write lock that the mount's own transactions need."""
    catalog.setup({"tenants": 64})
    pool = catalog.pool("tenants")["pid"]
    catalog.v.media.create(pool, "a.img")
    writer = sqlite3.connect(sqlite_path(catalog_url), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        reader, read = in_thread(lambda: catalog.v.changes.since(0))
        reader.join(LIVENESS_S)
        assert not reader.is_alive(), "the change feed waited for the write lock"
        assert [m.name for m in read[0].media] == ["a.img"]
    finally:
        writer.execute("COMMIT")
        writer.close()
