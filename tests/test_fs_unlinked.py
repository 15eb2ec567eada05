"""A file unlinked while open, used through its descriptor, as on the kernel's own
filesystems (issue 17): it grows (charged to its pool, ENOSPC at the quota),
ftruncate, fchmod, fchown, futimens, fsync and fallocate work, fstat says it has
no link, its name is free at once, and the room comes back at the last close, or,
after a crash, at the next start or with ``fsck --repair``.

Each sequence runs on the mount and in a plain directory of the test's temporary
directory: the kernel's answer there is the expected one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select
from support.fs import MIB, pool_show, sync_dir, used, vattr
from support.usage import assert_usage_consistent

from velocityfs.catalog.models import Holder, Media
from velocityfs.service.fsck import Fsck

TIMES = (1_600_000_000_123_456_789, 1_500_000_000_000_000_001)


def _commit(directory: Path) -> None:
    """The mount's unlinks reach the catalog now; a plain directory's are there."""
    sync_dir(directory)


def _state(fd: int, *, times: bool = False) -> dict[str, object]:
    """What fstat and a read say; the times only right after futimens set them (any
    other time is the moment of the change, on the mount as in the plain directory)."""
    st = os.fstat(fd)
    data = os.pread(fd, st.st_size + 1, 0)
    state: dict[str, object] = {
        "nlink": st.st_nlink,
        "size": st.st_size,
        "mode": oct(st.st_mode),
        "owner": (st.st_uid, st.st_gid),
        "sha": hashlib.sha256(data).hexdigest(),
    }
    if times:
        state["times"] = (st.st_atime_ns, st.st_mtime_ns)
    return state


def _use_unlinked(directory: Path) -> list[object]:
    """Open, write, unlink, then everything through the descriptor; what each step saw."""
    path = directory / "scratch.img"
    seen: list[object] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"a" * (MIB + 5))
        os.unlink(path)
        _commit(directory)
        seen.append(sorted(os.listdir(directory)))
        seen.append(_state(fd))
        os.pwrite(fd, b"b" * (3 * MIB), 2 * MIB)  # grows it past its first grant
        seen.append(_state(fd))
        os.ftruncate(fd, 4 * MIB + 7)
        seen.append(_state(fd))
        os.ftruncate(fd, MIB + 3)
        seen.append(_state(fd))
        os.fchmod(fd, 0o600)
        os.fchown(fd, os.getuid(), os.getgid())
        os.utime(fd, ns=TIMES)
        seen.append(_state(fd, times=True))
        os.fsync(fd)
        os.fdatasync(fd)
        os.posix_fallocate(fd, 0, 6 * MIB)
        seen.append(_state(fd))
        # The name is free at once: a new file of that name, while the old one is open.
        path.write_bytes(b"new file\n")
        seen.append(sorted(os.listdir(directory)))
        seen.append(path.read_bytes())
        os.pwrite(fd, b"c" * 10, 6 * MIB)
        seen.append(_state(fd))
    finally:
        os.close(fd)
    seen.append(path.read_bytes())
    seen.append(sorted(os.listdir(directory)))
    return seen


def test_an_unlinked_open_file_works_as_on_a_plain_directory(catalog, mount, tmp_path):
    catalog.setup({"p": 64})
    m = mount()
    plain = tmp_path / "plain"
    plain.mkdir()
    expected = _use_unlinked(plain)
    assert expected[1]["nlink"] == 0  # the kernel's answer, as the mount must give it
    assert _use_unlinked(m / "p") == expected
    assert used(m / "p") == len(b"new file\n")
    assert_usage_consistent(catalog.v)


def _fill(fd: int, chunk: int = MIB) -> int:
    """Write until ENOSPC; the bytes written."""
    total = 0
    while True:
        try:
            total += os.write(fd, b"x" * chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return total


def test_an_unlinked_file_fills_its_quota_and_gives_the_room_back_at_close(catalog, mount):
    catalog.setup({"p": 8})
    m = mount()
    path = m / "p" / "tmp.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * MIB)
        os.unlink(path)
        _commit(m / "p")
        assert _fill(fd) == 7 * MIB  # to the byte, as any file
        assert used(m / "p") == 8 * MIB
        assert os.fstat(fd).st_size == 8 * MIB
        with pytest.raises(OSError) as refused:
            (m / "p" / "other.img").write_bytes(b"y")
        assert refused.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert used(m / "p") == 0
    (m / "p" / "other.img").write_bytes(b"y" * 8 * MIB)
    assert used(m / "p") == 8 * MIB
    assert_usage_consistent(catalog.v)


def test_the_room_comes_back_when_the_last_descriptor_closes(catalog, mount):
    catalog.setup({"p": 64})
    m = mount()
    path = m / "p" / "shared.img"
    writer = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    reader = os.open(path, os.O_RDONLY)
    try:
        os.write(writer, os.urandom(3 * MIB))
        os.unlink(path)
        _commit(m / "p")
        assert os.listdir(m / "p") == []
        assert used(m / "p") >= 3 * MIB
        os.close(writer)
        writer = -1
        _commit(m / "p")
        assert used(m / "p") == 3 * MIB  # the writer's grant went back, the bytes stay
        assert os.fstat(reader).st_nlink == 0
        assert len(os.pread(reader, 4 * MIB, 0)) == 3 * MIB
        assert pool_show_media(catalog) == 0
    finally:
        if writer >= 0:
            os.close(writer)
        os.close(reader)
    assert used(m / "p") == 0
    assert _media_rows(catalog) == 0
    assert_usage_consistent(catalog.v)


def _replace_open(directory: Path) -> list[object]:
    """Open a file, rename another over it, use the first through its descriptor."""
    path, incoming = directory / "disk.img", directory / "disk.img.new"
    seen: list[object] = []
    path.write_bytes(b"old" * 1000)
    fd = os.open(path, os.O_RDWR)
    try:
        incoming.write_bytes(b"new\n")
        os.rename(incoming, path)
        _commit(directory)
        seen.append(sorted(os.listdir(directory)))
        seen.append(path.read_bytes())
        seen.append(_state(fd))
        os.pwrite(fd, b"g" * (2 * MIB), MIB)  # grows it past any first grant
        os.fchmod(fd, 0o600)
        seen.append(_state(fd))
    finally:
        os.close(fd)
    seen.append(sorted(os.listdir(directory)))
    seen.append(path.read_bytes())
    return seen


def test_a_file_replaced_by_rename_while_open_lives_on_until_its_last_close(
    catalog, mount, tmp_path
):
    catalog.setup({"p": 64})
    m = mount()
    plain = tmp_path / "plain"
    plain.mkdir()
    expected = _replace_open(plain)
    assert expected[2]["nlink"] == 0  # the kernel's answer, as the mount must give it
    assert _replace_open(m / "p") == expected
    _commit(m / "p")
    assert used(m / "p") == len(b"new\n")
    assert _media_rows(catalog) == 1
    assert_usage_consistent(catalog.v)


def pool_show_media(catalog) -> int:
    """Media the catalog lists in pool ``p`` (what ``pool show`` counts)."""
    return int(catalog.pool("p")["media"])


def _media_rows(catalog) -> int:
    """Media rows of any kind, listed or not."""
    with catalog.v.db.transaction() as s:
        return int(s.execute(select(func.count()).select_from(Media)).scalar_one())


def _crash_with_unlinked_open_file(catalog, mount) -> tuple[str, Path]:
    """A mount killed while a file it had unlinked was open and had grown; returns the
    media id and its backing file."""
    catalog.setup({"p": 64})
    m = mount()
    path = m / "p" / "held.img"
    (m / "p" / "kept.img").write_bytes(b"k" * MIB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, os.urandom(5 * MIB))
        media_id = vattr(path, "mid")
        backing = Path(vattr(path, "backing_path"))
        os.unlink(path)
        _commit(m / "p")
        os.write(fd, os.urandom(MIB))
        assert used(m / "p") >= 7 * MIB
        assert backing.exists()
        m.kill9()
    finally:
        with contextlib.suppress(OSError):  # the connection is gone
            os.close(fd)
    return media_id, backing


def _check_only_kept(catalog, media_id: str, backing: Path) -> None:
    assert catalog.used("p") == MIB
    assert pool_show_media(catalog) == 1
    assert _media_rows(catalog) == 1
    assert [v.name for v in catalog.v.media.all()] == ["kept.img"]
    with pytest.raises(Exception, match="no media"):
        catalog.v.media.get(media_id)
    assert not backing.exists()
    assert_usage_consistent(catalog.v)


def test_kill9_with_an_unlinked_open_file_the_next_start_returns_its_room(catalog, mount):
    media_id, backing = _crash_with_unlinked_open_file(catalog, mount)
    m = mount()
    assert os.listdir(m / "p") == ["kept.img"]
    assert used(m / "p") == MIB
    _check_only_kept(catalog, media_id, backing)


def test_fsck_repair_returns_the_room_of_a_crashed_unlinked_open_file(catalog, cli, mount):
    media_id, backing = _crash_with_unlinked_open_file(catalog, mount)
    assert pool_show(cli, "p")["used_bytes"] >= 7 * MIB
    assert cli("fsck", "--repair").returncode == 0
    assert pool_show(cli, "p")["used_bytes"] == MIB
    _check_only_kept(catalog, media_id, backing)
    m = mount()
    assert os.listdir(m / "p") == ["kept.img"]


def test_fsck_repair_removes_media_unlinked_open_by_a_process_gone_from_the_catalog(catalog):
    """A holder gone from the catalog (a reclaim cut short) that had not closed a media
    it unlinked while open: no reclaim will see it, so fsck reports and removes it. A
    clean retirement keeps the holder's row while such media are left."""
    catalog.setup({"p": 64})
    v = catalog.v
    pool = v.pool_by_ref("p").id
    kept = v.media.create(pool, "kept.img", size=MIB)
    left = v.media.create(pool, "left.img", size=3 * MIB)
    holder = v.ledger.register_holder()
    assert v.media.unlink_open([left.id], holder) == [left.id]
    assert [m.name for m in v.media.all()] == ["kept.img"]
    assert catalog.used("p") == 4 * MIB
    v.ledger.retire_holder(holder)
    assert holder in v.ledger.holder_ids()
    with v.db.transaction() as s:
        s.execute(delete(Holder).where(Holder.id == holder))

    problems = list(Fsck(v).run())
    assert [p.kind for p in problems] == ["unlinked-media"]
    problems[0].repair()
    assert catalog.used("p") == MIB
    assert _media_rows(catalog) == 1
    assert v.backing.size(left.volume, left.id) is None
    assert v.backing.size(kept.volume, kept.id) == MIB
    assert list(Fsck(v).run()) == []
    assert_usage_consistent(v)
