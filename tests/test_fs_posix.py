"""POSIX answers where users feel them, each compared with the kernel's own answer for
the same operation on a plain directory of the host (the test's tmp_path, ext4 here),
never with a constant: long names, directory link counts, ``.`` and ``..``, sizes no
volume can hold.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support.fs import MIB, used

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
LONG = "n" * 256  # one byte past NAME_MAX


def outcome(fn: Callable[[], object]) -> str:
    """What an operation came to: "ok" or the name of its errno."""
    try:
        fn()
    except OSError as exc:
        return os.strerror(exc.errno or 0)
    return "ok"


def long_name_operations(top: Path) -> dict[str, Callable[[], object]]:
    """Every kind of call that takes a path, with a 256-byte component; ``top`` holds a
    file ``a.img`` and a directory ``sub``."""
    long = top / LONG
    return {
        "stat": lambda: os.stat(long),
        "lstat": lambda: os.lstat(long),
        "chmod": lambda: os.chmod(long, 0o600),
        "chown": lambda: os.chown(long, 0, 0),
        "utime": lambda: os.utime(long, (1, 1)),
        "truncate": lambda: os.truncate(long, 0),
        "open": lambda: os.close(os.open(long, os.O_RDONLY)),
        "create": lambda: os.close(os.open(long, os.O_WRONLY | os.O_CREAT, 0o600)),
        "unlink": lambda: os.unlink(long),
        "mkdir": lambda: os.mkdir(long),
        "rmdir": lambda: os.rmdir(long),
        "rename from": lambda: os.rename(long, top / "b.img"),
        "rename to": lambda: os.rename(top / "a.img", long),
        "rename dir to": lambda: os.rename(top / "sub", long),
        "getxattr": lambda: os.getxattr(long, "user.x"),
        "listdir": lambda: os.listdir(long),
        "below it": lambda: os.stat(long / "a.img"),
    }


def test_a_name_longer_than_255_bytes_is_too_long_for_every_call(tmp_path, catalog, mount):
    host = tmp_path / "host"
    host.mkdir()
    (host / "a.img").write_bytes(b"a")
    (host / "sub").mkdir()
    expected = {name: outcome(op) for name, op in long_name_operations(host).items()}
    assert set(expected.values()) == {os.strerror(36)}, expected  # ENAMETOOLONG

    catalog.setup({"tenants": 64})
    m = mount()
    pool = m / "tenants"
    (pool / "a.img").write_bytes(b"a")
    (pool / "sub").mkdir()
    got = {name: outcome(op) for name, op in long_name_operations(pool).items()}
    assert got == expected
    assert sorted(os.listdir(pool)) == ["a.img", "sub"]
    assert (pool / "a.img").read_bytes() == b"a"
    m.stop()


def link_counts(top: Path) -> list[tuple[str, int]]:
    """Directory link counts of ``top``'s tree, in a fixed order."""
    return [
        (str(d.relative_to(top)), os.stat(d).st_nlink)
        for d in sorted([top, *(p for p in top.rglob("*") if p.is_dir())])
    ]


def tree_steps(top: Path) -> list[list[tuple[str, int]]]:
    """Subdirectories made, moved (also onto an empty one) and removed; the link counts
    after each step. ``top`` holds ``a`` and ``b``."""
    for path in ("a/m.img", "b/m.img"):
        (top / path).write_bytes(b"m")  # files count for nothing
    seen = [link_counts(top)]
    for path in ("a/x", "a/y", "a/y/deep", "b/z"):
        (top / path).mkdir()
        seen.append(link_counts(top))
    steps: list[Callable[[], object]] = [
        lambda: os.rename(top / "a/y", top / "b/y"),  # a subdirectory changes parents
        lambda: os.rename(top / "a/x", top / "b/z"),  # onto an empty one: b keeps its count
        lambda: os.rename(top / "b/y/deep", top / "b/y/deeper"),
        lambda: os.rmdir(top / "b/y/deeper"),
        lambda: os.rename(top / "b/z", top / "a/z"),
    ]
    for step in steps:
        step()
        seen.append(link_counts(top))
    return seen


def test_a_directory_links_count_its_subdirectories(tmp_path, catalog, mount):
    host = tmp_path / "host"
    for path in ("a", "b"):
        (host / path).mkdir(parents=True)
    expected = tree_steps(host)
    assert expected[-1] != expected[0]

    catalog.setup({"a": 64, "b": 64})
    m = mount()
    # The mount's root is the store's top: its pools are the host's a and b.
    assert tree_steps(m.path) == expected
    m.stop()
    m = mount()  # and as read back from the catalog
    assert link_counts(m.path) == expected[-1]
    m.stop()


def listing(path: Path) -> list[str]:
    return subprocess.run(
        ["ls", "-a", "-1", str(path)], check=True, capture_output=True, text=True
    ).stdout.split()


def test_a_listing_shows_dot_and_dot_dot(tmp_path, catalog, mount):
    host = tmp_path / "host"
    (host / "sub").mkdir(parents=True)
    (host / "a.img").write_bytes(b"a")

    catalog.setup({"tenants": 64})
    m = mount()
    pool = m / "tenants"
    (pool / "sub").mkdir()
    (pool / "a.img").write_bytes(b"a")
    assert listing(pool) == listing(host) == [".", "..", "a.img", "sub"]
    assert listing(pool / "sub") == listing(host / "sub") == [".", ".."]
    assert listing(m.path) == [".", "..", "tenants"]
    assert sorted(os.listdir(pool)) == sorted(os.listdir(host))  # the dots are not entries
    m.stop()


@SQLITE_ONLY
def test_a_size_no_volume_holds_is_efbig_and_past_the_quota_enospc(tmp_path, catalog, mount):
    huge = (1 << 63) - 1
    host = tmp_path / "host.img"  # the store's volume is on the same filesystem
    host.write_bytes(b"h" * 1000)
    with open(host, "r+b") as f:
        expected = {
            "truncate": outcome(lambda: os.truncate(host, huge)),
            "ftruncate": outcome(lambda: os.ftruncate(f.fileno(), huge)),
            "fallocate": outcome(lambda: os.posix_fallocate(f.fileno(), 0, huge)),
        }
    assert set(expected.values()) == {os.strerror(27)}, expected  # EFBIG

    catalog.setup({"tenants": 64})
    m = mount()
    media = m / "tenants" / "disk.img"
    media.write_bytes(b"m" * 1000)
    before = used(m / "tenants")
    with open(media, "r+b") as f:
        got = {
            "truncate": outcome(lambda: os.truncate(media, huge)),
            "ftruncate": outcome(lambda: os.ftruncate(f.fileno(), huge)),
            "fallocate": outcome(lambda: os.posix_fallocate(f.fileno(), 0, huge)),
        }
        assert got == expected
        # Within what the volume holds but past the quota: the quota's ENOSPC.
        assert outcome(lambda: os.ftruncate(f.fileno(), 65 * MIB)) == os.strerror(28)
    assert media.read_bytes() == b"m" * 1000
    assert used(m / "tenants") == before
    os.truncate(media, 64 * MIB)  # the quota, exactly, still fits
    assert os.path.getsize(media) == 64 * MIB
    m.stop()


def times(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_atime_ns, st.st_mtime_ns


def test_a_directory_keeps_its_access_time_apart_from_its_modification_time(
    tmp_path, catalog, mount
):
    host = tmp_path / "host"
    (host / "sub").mkdir(parents=True)
    stamps = (1_600_000_000_123_456_789, 1_700_000_000_987_654_321)
    os.utime(host / "sub", ns=stamps)
    expected = times(host / "sub")
    assert expected == stamps

    catalog.setup({"tenants": 64})
    m = mount()
    sub = m / "tenants" / "sub"
    sub.mkdir()
    os.utime(sub, ns=stamps)
    assert times(sub) == expected
    os.utime(m / "tenants", ns=stamps)  # a pool the administrator made, too
    assert times(m / "tenants") == expected
    m.stop()
    m = mount()  # as the catalog keeps them
    assert times(m / "tenants" / "sub") == times(m / "tenants") == expected
    m.stop()
