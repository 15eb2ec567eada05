"""Every rule of the service layer, with the exact exception class each refusal raises.

The adapters (FUSE, HTTP, CLI) map these classes to errno, status codes and exit
codes, so a refusal that raises the wrong class is a bug even when it refuses. Each
refusal is also checked to change nothing. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from support.bulk import insert_media
from support.usage import assert_usage_consistent, grant_count

from velocityfs.catalog.models import AuthKey, Grant, Holder, Media, User
from velocityfs.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidName,
    InvalidValue,
    NameTooLong,
    NotEmpty,
    NotFound,
    QuotaAboveAncestor,
    QuotaBelowUsage,
    QuotaExceeded,
    VelocityError,
)
from velocityfs.service.accounts import PERMISSIONS, ROOT_GROUP, caller_of
from velocityfs.service.chains import charge
from velocityfs.service.velocity import Velocity

KIB = 1 << 10
MIB = 1 << 20
VIEW = "velocity.pool.view"
CREATE = "velocity.pool.create"
MEDIA_READ = "velocity.pool.media.read"
MEDIA_WRITE = "velocity.pool.media.write"


@pytest.fixture
def v(catalog_url: str, store_dir: Path) -> Iterator[Velocity]:
    vel = Velocity(catalog_url, store_dir)
    vel.init()
    yield vel
    vel.close()


def raises_exactly(cls: type[VelocityError], fn: Callable[..., Any], *args: Any, **kw: Any):
    """Call ``fn`` and require a refusal of exactly class ``cls`` (not a sub- or superclass)."""
    with pytest.raises(VelocityError) as info:
        fn(*args, **kw)
    assert type(info.value) is cls, (
        f"{fn.__qualname__} raised {type(info.value).__name__}({info.value}), "
        f"expected {cls.__name__}"
    )
    return info.value


def snapshot(v: Velocity) -> tuple[list[tuple], list[tuple], list[tuple]]:  # type: ignore[type-arg]
    """Everything a refusal must leave alone: pools, media and grants."""
    pools = sorted((p.id, p.parent_id, p.name, p.quota_bytes, p.used_bytes) for p in v.pools.all())
    media = sorted((m.id, m.pool_id, m.name, m.size, m.volume) for m in v.media.all())
    with v.db.transaction() as s:
        grants = sorted(
            tuple(r)
            for r in s.execute(
                select(Grant.id, Grant.pool_id, Grant.media_id, Grant.holder_id, Grant.bytes)
            )
        )
    return pools, media, grants


def used(v: Velocity, pool_id: str) -> int:
    return v.pools.get(pool_id).used_bytes


def store_files(store: Path) -> set[Path]:
    return {p for p in (store / "media").rglob("*") if p.is_file()}


# -- names -------------------------------------------------------------------------------

BAD_NAMES = ["", ".", "..", "/", "a/b", "/a", "a/", "\0", "a\0b", "\udcff"]


def test_names_follow_the_kernels_rule_everywhere(v: Velocity) -> None:
    root = v.pools.create(None, "root", MIB)
    sub = v.pools.create(root.id, "sub", None)
    media = v.media.create(root.id, "disk.img")
    v.accounts.add_user("alice", "pw")
    makers: dict[str, Callable[[str], object]] = {
        "root pool": lambda n: v.pools.create(None, n, MIB),
        "subpool": lambda n: v.pools.create(root.id, n, None),
        "media": lambda n: v.media.create(root.id, n),
        "pool rename": lambda n: v.pools.rename(sub.id, root.id, n),
        "media rename": lambda n: v.media.rename(media.id, root.id, n),
        "user": lambda n: v.accounts.add_user(n, "pw"),
        "group": lambda n: v.accounts.add_group(n),
    }
    before = snapshot(v)
    users, groups = v.accounts.users(), v.accounts.groups()
    for what, make in makers.items():
        for bad in BAD_NAMES:
            with pytest.raises(InvalidName) as info:
                make(bad)
            assert type(info.value) is InvalidName, (what, bad, info.value)
        # 256 bytes of UTF-8 in only 128 (or 86) characters: the limit is in bytes.
        for long in ("a" * 256, "é" * 128, "€" * 86, "x" * 1000):
            raises_exactly(NameTooLong, make, long)
    assert snapshot(v) == before
    assert v.accounts.users() == users and v.accounts.groups() == groups

    # 255 bytes is fine, however many characters that is.
    for i, ok in enumerate(("a" * 255, "é" * 127 + "a", "€" * 85)):
        assert len(ok.encode()) == 255
        assert v.pools.create(None, ok, MIB).name == ok
        assert v.pools.create(root.id, ok, None).name == ok
        assert v.media.create(sub.id, ok).name == ok
        v.accounts.add_user(ok, "pw")
        v.accounts.add_group(ok)
        v.pools.rename(sub.id, root.id, f"{i}" + ok[1:])
    assert v.pools.resolve("root/" + "é" * 127 + "a").parent_id == root.id
    # Anything else goes: spaces, dots inside, leading dashes, unicode.
    for odd in (" ", "...", ".hidden", "-rf", "a b", "ü\t", "名前"):
        v.media.create(root.id, odd)


# -- the pool tree -----------------------------------------------------------------------


def test_pools_form_a_tree_addressed_by_path_or_id(v: Velocity) -> None:
    tenants = v.pools.create(None, "tenants", 100 * MIB)
    acme = v.pools.create(tenants.id, "acme", 10 * MIB)
    web = v.pools.create(acme.id, "web", None)
    v.pools.create(tenants.id, "globex", None)
    v.pools.create(None, "isos", MIB)
    assert [(r.depth, r.path) for r in v.tree()] == [
        (0, "isos"),
        (0, "tenants"),
        (1, "tenants/acme"),
        (2, "tenants/acme/web"),
        (1, "tenants/globex"),
    ]
    assert (web.parent_id, web.quota_bytes, web.used_bytes) == (acme.id, None, 0)
    assert v.pools.get(web.id).name == "web"
    assert v.pools.resolve("tenants/acme/web").id == web.id
    assert v.pools.resolve("/tenants/acme/").id == acme.id
    assert v.pools.path(web.id) == "tenants/acme/web"
    assert v.pool_by_ref(web.id).id == web.id
    assert v.pool_by_ref("tenants/acme").id == acme.id
    raises_exactly(NotFound, v.pools.resolve, "tenants/nope")
    raises_exactly(NotFound, v.pools.resolve, "acme")  # not a root pool
    raises_exactly(NotFound, v.pools.get, "no-such-id")
    raises_exactly(NotFound, v.pool_by_ref, "nope")
    before = snapshot(v)
    raises_exactly(NotFound, v.pools.create, "no-such-id", "x", None)
    raises_exactly(NotFound, v.media.create, "no-such-id", "x")
    assert snapshot(v) == before


def test_pools_and_media_share_one_namespace_per_pool(v: Velocity, store_dir: Path) -> None:
    root = v.pools.create(None, "root", MIB)
    sub = v.pools.create(root.id, "sub", None)
    disk = v.media.create(root.id, "disk.img")
    other = v.media.create(root.id, "other.img")
    before, files = snapshot(v), store_files(store_dir)
    raises_exactly(Conflict, v.pools.create, root.id, "sub", None)  # pool like pool
    raises_exactly(Conflict, v.pools.create, root.id, "disk.img", None)  # pool like media
    raises_exactly(Conflict, v.media.create, root.id, "sub")  # media like pool
    raises_exactly(Conflict, v.media.create, root.id, "disk.img")  # media like media
    raises_exactly(Conflict, v.pools.rename, sub.id, root.id, "disk.img")
    raises_exactly(Conflict, v.media.rename, disk.id, root.id, "sub")
    raises_exactly(Conflict, v.pools.create, None, "root", MIB)  # duplicate root
    assert snapshot(v) == before
    assert store_files(store_dir) == files  # no backing file left by a refused create
    # The same names are free in another pool, and a root may share a subpool's name.
    v.pools.create(sub.id, "sub", None)
    v.pools.create(sub.id, "other.img", None)
    v.media.create(sub.id, "disk.img")
    v.pools.create(None, "sub", MIB)
    assert v.media.get(other.id).pool_id == root.id


# -- quotas ------------------------------------------------------------------------------


def test_root_pools_need_a_quota_and_quotas_are_not_negative(v: Velocity) -> None:
    raises_exactly(InvalidValue, v.pools.create, None, "r", None)
    raises_exactly(InvalidValue, v.pools.create, None, "r", -1)
    assert v.pools.all() == []
    root = v.pools.create(None, "r", 0)  # zero is a quota: nothing fits
    v.pools.set_quota(root.id, MIB)
    sub = v.pools.create(root.id, "s", None)
    raises_exactly(InvalidValue, v.pools.create, root.id, "neg", -1)
    raises_exactly(InvalidValue, v.pools.set_quota, root.id, None)
    raises_exactly(InvalidValue, v.pools.set_quota, root.id, -1)
    raises_exactly(InvalidValue, v.pools.set_quota, sub.id, -1)
    assert v.pools.get(root.id).quota_bytes == MIB
    assert v.pools.get(sub.id).quota_bytes is None


def test_a_quota_may_not_exceed_any_ancestors(v: Velocity) -> None:
    root = v.pools.create(None, "root", 100 * KIB)
    a = v.pools.create(root.id, "a", 60 * KIB)
    inherit = v.pools.create(a.id, "inherit", None)
    mid = v.pools.create(root.id, "mid", None)
    before = snapshot(v)
    raises_exactly(QuotaAboveAncestor, v.pools.create, root.id, "x", 100 * KIB + 1)
    raises_exactly(QuotaAboveAncestor, v.pools.create, a.id, "x", 60 * KIB + 1)
    # Above a higher ancestor, with an inheriting pool in between.
    raises_exactly(QuotaAboveAncestor, v.pools.create, inherit.id, "x", 60 * KIB + 1)
    raises_exactly(QuotaAboveAncestor, v.pools.create, mid.id, "x", 100 * KIB + 1)
    raises_exactly(QuotaAboveAncestor, v.pools.set_quota, a.id, 100 * KIB + 1)
    raises_exactly(QuotaAboveAncestor, v.pools.set_quota, inherit.id, 60 * KIB + 1)
    raises_exactly(QuotaAboveAncestor, v.pools.set_quota, mid.id, 100 * KIB + 1)
    assert snapshot(v) == before
    # Equal is fine, and siblings may together promise more than the parent has.
    assert v.pools.create(inherit.id, "eq", 60 * KIB).quota_bytes == 60 * KIB
    v.pools.create(root.id, "b", 80 * KIB)
    v.pools.create(root.id, "c", 100 * KIB)
    v.pools.set_quota(mid.id, 100 * KIB)
    deep = v.pools.create(mid.id, "deep", 90 * KIB)
    assert sum(p.quota_bytes or 0 for p in v.pools.all() if p.parent_id == root.id) > 100 * KIB
    # A subpool may go back to inheriting; its children are then bound by the next quota up.
    assert v.pools.set_quota(mid.id, None).quota_bytes is None
    raises_exactly(QuotaAboveAncestor, v.pools.set_quota, deep.id, 100 * KIB + 1)
    v.pools.set_quota(deep.id, 100 * KIB)


def test_lowering_a_quota_below_usage_or_a_subpools_quota_is_refused(v: Velocity) -> None:
    root = v.pools.create(None, "root", 100 * KIB)
    a = v.pools.create(root.id, "a", 60 * KIB)
    x = v.pools.create(a.id, "x", None)
    y = v.pools.create(x.id, "y", 40 * KIB)
    v.media.create(y.id, "m", size=30 * KIB)
    before = snapshot(v)
    raises_exactly(QuotaBelowUsage, v.pools.set_quota, y.id, 30 * KIB - 1)
    raises_exactly(QuotaBelowUsage, v.pools.set_quota, x.id, 30 * KIB - 1)
    raises_exactly(QuotaBelowUsage, v.pools.set_quota, root.id, 30 * KIB - 1)
    # Above the usage but below a subpool's (or a deeper pool's) quota.
    raises_exactly(QuotaAboveAncestor, v.pools.set_quota, x.id, 40 * KIB - 1)
    raises_exactly(QuotaAboveAncestor, v.pools.set_quota, a.id, 40 * KIB - 1)
    raises_exactly(QuotaAboveAncestor, v.pools.set_quota, root.id, 60 * KIB - 1)
    assert snapshot(v) == before
    # Grants count as usage too.
    holder = v.ledger.register_holder()
    mid = v.media.all()[0].id
    v.ledger.reserve(mid, holder, 5 * KIB, chunk=5 * KIB)
    raises_exactly(QuotaBelowUsage, v.pools.set_quota, y.id, 35 * KIB - 1)
    assert v.pools.set_quota(y.id, 35 * KIB).quota_bytes == 35 * KIB
    assert v.pools.set_quota(x.id, 35 * KIB).quota_bytes == 35 * KIB
    assert v.pools.set_quota(root.id, 60 * KIB).quota_bytes == 60 * KIB
    assert_usage_consistent(v)


# -- the ledger --------------------------------------------------------------------------


def test_reserve_is_refused_when_any_ancestor_would_pass_its_quota(v: Velocity) -> None:
    root = v.pools.create(None, "root", 100 * KIB)
    a = v.pools.create(root.id, "a", 80 * KIB)
    g = v.pools.create(a.id, "g", 60 * KIB)
    b = v.pools.create(root.id, "b", None)
    filler = v.media.create(b.id, "filler", size=50 * KIB)
    disk = v.media.create(g.id, "disk")
    holder = v.ledger.register_holder()
    # available() is the minimum over the whole chain, not the pool's own room.
    assert [v.pools.available(p.id) for p in (root, a, g, b)] == [50 * KIB] * 4

    before = snapshot(v)
    raises_exactly(QuotaExceeded, v.ledger.reserve, disk.id, holder, 50 * KIB + 1)
    assert snapshot(v) == before
    got = v.ledger.reserve(disk.id, holder, 55 * KIB, partial=True)
    assert got.added == 50 * KIB  # exactly what fits
    assert [used(v, p.id) for p in (root, a, g, b)] == [100 * KIB, 50 * KIB, 50 * KIB, 50 * KIB]
    with v.db.transaction() as s:
        grant = s.execute(select(Grant)).scalar_one()
        assert (grant.id, grant.bytes) == (got.grant_id, 50 * KIB)
        assert (grant.holder_id, grant.media_id, grant.pool_id) == (holder, disk.id, g.id)
    assert [v.pools.available(p.id) for p in (root, a, g, b)] == [0] * 4
    before = snapshot(v)
    raises_exactly(QuotaExceeded, v.ledger.reserve, disk.id, holder, 1, partial=True)
    raises_exactly(QuotaExceeded, v.ledger.reserve, disk.id, holder, 1)
    raises_exactly(QuotaExceeded, v.media.create, a.id, "more", size=1)
    assert snapshot(v) == before

    # Settling returns what was not written; a release (size unchanged) returns it all.
    v.ledger.settle(disk.id, holder, 20 * KIB, 0)
    assert v.media.get(disk.id).size == 20 * KIB
    assert grant_count(v) == 0
    assert [used(v, p.id) for p in (root, a, g)] == [70 * KIB, 20 * KIB, 20 * KIB]
    assert v.pools.available(g.id) == 30 * KIB

    # Now g's own quota is the tightest.
    v.media.remove(filler.id)
    assert v.pools.available(root.id) == 80 * KIB
    assert v.pools.available(g.id) == 40 * KIB
    raises_exactly(QuotaExceeded, v.ledger.reserve, disk.id, holder, 40 * KIB + 1)
    assert v.ledger.reserve(disk.id, holder, 64 * KIB, partial=True).added == 40 * KIB
    v.ledger.settle(disk.id, holder, 20 * KIB, 0)  # nothing written: a plain release
    assert used(v, g.id) == 20 * KIB
    assert grant_count(v) == 0
    assert_usage_consistent(v)


def test_grants_grow_settle_keep_and_record_their_holders(v: Velocity) -> None:
    root = v.pools.create(None, "root", 10 * MIB)
    disk = v.media.create(root.id, "disk")
    h1, h2 = v.ledger.register_holder(), v.ledger.register_holder()
    # Far from the limit a writer may get more than it asked for, never less.
    got = v.ledger.reserve(disk.id, h1, 1000)
    assert got.added >= 1000
    first = got.added
    again = v.ledger.reserve(disk.id, h1, 10 * KIB, chunk=10 * KIB)
    assert again.grant_id == got.grant_id  # one grant per holder and media, grown
    other = v.ledger.reserve(disk.id, h2, 5 * KIB, chunk=5 * KIB)
    assert other.grant_id != got.grant_id
    with v.db.transaction() as s:
        holders = dict(s.execute(select(Grant.holder_id, Grant.bytes)).all())
    assert holders == {h1: first + 10 * KIB, h2: 5 * KIB}
    assert used(v, root.id) == first + 15 * KIB

    # Settle with keep: the size is recorded, the grant shrinks to keep.
    v.ledger.settle(disk.id, h1, 3 * KIB, keep=2 * KIB)
    assert v.media.get(disk.id).size == 3 * KIB
    assert used(v, root.id) == 3 * KIB + 2 * KIB + 5 * KIB
    v.ledger.settle(disk.id, h2, 3 * KIB, 0)
    v.ledger.settle(disk.id, h1, 4 * KIB, 0)  # wrote 1 KiB of the 2 KiB kept
    assert used(v, root.id) == 4 * KIB
    assert grant_count(v) == 0

    # Growth without a grant is charged, and refused (changing nothing) when it does not fit.
    v.ledger.settle(disk.id, h1, 6 * MIB, 0)
    assert used(v, root.id) == 6 * MIB
    before = snapshot(v)
    raises_exactly(QuotaExceeded, v.ledger.settle, disk.id, h1, 10 * MIB + 1, 0)
    raises_exactly(QuotaExceeded, v.ledger.settle, disk.id, h1, 6 * MIB, 4 * MIB + 1)
    assert snapshot(v) == before
    v.ledger.settle(disk.id, h1, 0, 0)  # truncate to 0
    assert used(v, root.id) == 0
    raises_exactly(NotFound, v.ledger.reserve, "no-such-media", h1, 1)
    raises_exactly(NotFound, v.ledger.settle, "no-such-media", h1, 1, 0)
    assert_usage_consistent(v)


def test_settle_keeping_or_holding_makes_the_grant_row_a_holder_lacks(v: Velocity) -> None:
    """A holder without a grant row (its lease reclaimed, then registered again, while
    the file stayed open for writing) settles with ``keep`` or ``hold``: the settle
    makes the row, charging what it keeps."""
    root = v.pools.create(None, "root", 10 * MIB)
    kept = v.media.create(root.id, "kept", size=KIB)
    held = v.media.create(root.id, "held", size=KIB)
    holder = v.ledger.register_holder()
    assert grant_count(v) == 0

    v.ledger.settle(kept.id, holder, 3 * KIB, keep=5 * KIB)
    v.ledger.settle(held.id, holder, 2 * KIB, hold=True)
    with v.db.transaction() as s:
        rows = {
            r.media_id: (r.holder_id, r.pool_id, r.bytes)
            for r in s.execute(select(Grant.media_id, Grant.holder_id, Grant.pool_id, Grant.bytes))
        }
    assert rows == {kept.id: (holder, root.id, 5 * KIB), held.id: (holder, root.id, 0)}
    assert (v.media.get(kept.id).size, v.media.get(held.id).size) == (3 * KIB, 2 * KIB)
    assert used(v, root.id) == 3 * KIB + 5 * KIB + 2 * KIB
    assert_usage_consistent(v)

    # The rows are the holder's grants like any other: a plain settle drops them.
    v.ledger.settle(kept.id, holder, 4 * KIB)
    v.ledger.settle(held.id, holder, 2 * KIB)
    assert grant_count(v) == 0
    assert used(v, root.id) == 6 * KIB
    assert_usage_consistent(v)


@contextmanager
def count_statements(v: Velocity) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(_conn, _cursor, statement, _params, _context, _executemany) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    event.listen(v.db.engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(v.db.engine, "before_cursor_execute", record)


def add_sibling_media(v: Velocity, pool_id: str, count: int) -> None:
    """``count`` media of 1 byte, each with a 1-byte grant of another holder, in one go.

    Inserted directly (through the service this would take a while on PostgreSQL);
    the pool chain is charged in the same transaction, so the catalog stays consistent.
    """
    now = time.time_ns()
    with v.db.transaction() as s:
        rows = [
            Media(
                pool_id=pool_id,
                name=f"sibling-{i:04d}",
                size=1,
                volume="DEFAULT",
                mode=0o644,
                uid=0,
                gid=0,
                atime_ns=now,
                mtime_ns=now,
                ctime_ns=now,
            )
            for i in range(count)
        ]
        s.add_all(rows)
        s.flush()
        s.add_all(
            Grant(pool_id=pool_id, media_id=m.id, holder_id="other", bytes=1, created_ns=now)
            for m in rows
        )
    with v.db.statements() as conn:
        (chain,) = v.chains.lock(conn, pool_id)
        charge(conn, chain, 2 * count)


def test_a_reservation_costs_statements_by_depth_not_by_media(v: Velocity) -> None:
    holder = v.ledger.register_holder()
    parent = None
    pools = []
    for depth in range(1, 6):
        pool = v.pools.create(parent, f"l{depth}", 100 * MIB if parent is None else None)
        pools.append(pool.id)
        parent = pool.id

    def cost(pool_id: str, name: str) -> tuple[int, int]:
        """Statements of a first reserve and a settle on a fresh media in ``pool_id``."""
        mid = v.media.create(pool_id, name).id
        with count_statements(v) as reserve_sql:
            v.ledger.reserve(mid, holder, 4 * KIB)
        with count_statements(v) as settle_sql:
            v.ledger.settle(mid, holder, KIB, 0)
        assert reserve_sql and settle_sql  # the listener does see the SQL
        return len(reserve_sql), len(settle_sql)

    by_depth = [cost(pid, f"probe-{d}") for d, pid in enumerate(pools)]
    reserve_cost = [r for r, _ in by_depth]
    settle_cost = [s for _, s in by_depth]
    for costs in (reserve_cost, settle_cost):
        steps = {b - a for a, b in zip(costs, costs[1:], strict=False)}
        # Linear in depth: one lock per pool on PostgreSQL; on SQLite, where BEGIN
        # IMMEDIATE holds every lock, the whole chain is one read.
        assert len(steps) == 1 and steps.pop() >= 0, costs

    add_sibling_media(v, pools[1], 1000)
    assert v.pools.media_count(pools[1]) == 1000 + 1  # the siblings and probe-1
    assert cost(pools[1], "probe-crowded") == by_depth[1]
    assert cost(pools[4], "probe-below-crowd") == by_depth[4]
    assert_usage_consistent(v)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(proc.stdout)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def add_holder(v: Velocity, pid: int, host: str | None = None) -> str:
    """A holder of process ``pid`` on ``host`` whose lease runs for the catalog's length."""
    now = time.time_ns()
    with v.db.transaction() as s:
        holder = Holder(
            host=host or socket.gethostname(),
            pid=pid,
            started_ns=now,
            heartbeat_ns=now,
            expires_ns=now + v.ledger.lease_ns,
        )
        s.add(holder)
        s.flush()
        return holder.id


def test_grants_of_dead_holders_are_reclaimed_keeping_written_bytes(v: Velocity) -> None:
    root = v.pools.create(None, "root", 10 * MIB)
    pool = v.pools.create(root.id, "vms", None)
    wrote = v.media.create(pool.id, "wrote")
    overran = v.media.create(pool.id, "overran")
    idle = v.media.create(pool.id, "idle", size=KIB)
    dead = add_holder(v, dead_pid())
    elsewhere = add_holder(v, dead_pid(), host="another-host")  # not ours to judge
    alive = v.ledger.register_holder()
    assert set(v.ledger.dead_holders()) == {dead}

    v.ledger.reserve(wrote.id, dead, 64 * KIB, chunk=64 * KIB)
    v.ledger.reserve(overran.id, dead, 4 * KIB, chunk=4 * KIB)
    v.ledger.reserve(idle.id, dead, 8 * KIB, chunk=8 * KIB)
    v.ledger.reserve(idle.id, alive, 2 * KIB, chunk=2 * KIB)
    v.ledger.reserve(idle.id, elsewhere, 3 * KIB, chunk=3 * KIB)
    assert used(v, root.id) == KIB + 64 * KIB + 4 * KIB + 8 * KIB + 2 * KIB + 3 * KIB
    # The dead writer got 3000 bytes into one file, and more than it was granted into
    # another (as if the grant had been lost: bytes on disk all the same, perhaps
    # acknowledged to a client); the third it never touched.
    with open(wrote.backing_path, "r+b") as f:
        f.write(b"x" * 3000)
    with open(overran.backing_path, "r+b") as f:
        f.write(b"y" * 10_000)

    assert v.reclaim_dead_holders() == 3
    assert v.media.get(wrote.id).size == 3000
    assert v.media.get(overran.id).size == 10_000  # what is on disk is charged
    assert os.path.getsize(overran.backing_path) == 10_000  # and never cut
    assert v.media.get(idle.id).size == KIB
    assert used(v, pool.id) == used(v, root.id) == 3000 + 10_000 + KIB + 2 * KIB + 3 * KIB
    with v.db.transaction() as s:
        left = sorted(s.execute(select(Grant.holder_id, Grant.bytes)).all())
        holders = set(s.execute(select(Holder.id)).scalars())
    assert left == sorted([(alive, 2 * KIB), (elsewhere, 3 * KIB)])
    assert dead not in holders and {alive, elsewhere} <= holders
    assert v.reclaim_dead_holders() == 0
    assert_usage_consistent(v)


# -- usage through media operations ------------------------------------------------------


def test_media_creation_charges_the_whole_chain(v: Velocity, store_dir: Path) -> None:
    root = v.pools.create(None, "root", 100 * KIB)
    a = v.pools.create(root.id, "a", 50 * KIB)
    a1 = v.pools.create(a.id, "a1", None)
    m = v.media.create(a1.id, "m", size=30 * KIB)
    assert Path(m.backing_path).stat().st_size == 30 * KIB  # sparse, full apparent size
    assert [used(v, p.id) for p in (root, a, a1)] == [30 * KIB] * 3
    before, files = snapshot(v), store_files(store_dir)
    raises_exactly(QuotaExceeded, v.media.create, a1.id, "big", size=20 * KIB + 1)
    raises_exactly(InvalidValue, v.media.create, a1.id, "neg", size=-1)
    assert snapshot(v) == before
    assert store_files(store_dir) == files
    v.media.create(a1.id, "fits", size=20 * KIB)
    assert used(v, a.id) == 50 * KIB
    assert_usage_consistent(v)


def test_moving_media_moves_its_usage_or_changes_nothing(v: Velocity) -> None:
    root = v.pools.create(None, "root", 100 * KIB)
    a = v.pools.create(root.id, "a", 60 * KIB)
    a1 = v.pools.create(a.id, "a1", None)
    b = v.pools.create(root.id, "b", 30 * KIB)
    m = v.media.create(a1.id, "m", size=20 * KIB)
    assert v.media.rename(m.id, b.id, "m2") is None
    moved = v.media.get(m.id)
    assert (moved.pool_id, moved.name, moved.size) == (b.id, "m2", 20 * KIB)
    assert [used(v, p.id) for p in (root, a, a1, b)] == [20 * KIB, 0, 0, 20 * KIB]

    big = v.media.create(a.id, "big", size=25 * KIB)
    before = snapshot(v)
    raises_exactly(QuotaExceeded, v.media.rename, big.id, b.id, "big")  # 45 KiB > 30 KiB
    raises_exactly(NotFound, v.media.rename, big.id, "no-such-pool", "big")
    raises_exactly(NotFound, v.media.rename, "no-such-media", b.id, "big")
    assert snapshot(v) == before

    # An outstanding grant moves with the media.
    holder = v.ledger.register_holder()
    v.ledger.reserve(m.id, holder, 5 * KIB, chunk=5 * KIB)
    v.media.rename(m.id, a1.id, "m")
    assert [used(v, p.id) for p in (root, a, a1, b)] == [50 * KIB, 50 * KIB, 25 * KIB, 0]
    with v.db.transaction() as s:
        assert s.execute(select(Grant.pool_id)).scalar_one() == a1.id
    v.ledger.settle(m.id, holder, 22 * KIB, 0)
    assert [used(v, p.id) for p in (root, a, a1, b)] == [47 * KIB, 47 * KIB, 22 * KIB, 0]
    # A rename within a pool changes no usage; renaming onto itself is a no-op.
    v.media.rename(m.id, a1.id, "renamed")
    assert v.media.rename(m.id, a1.id, "renamed") is None
    assert [used(v, p.id) for p in (root, a, a1, b)] == [47 * KIB, 47 * KIB, 22 * KIB, 0]
    assert_usage_consistent(v)


def test_a_rename_onto_media_replaces_it(v: Velocity) -> None:
    root = v.pools.create(None, "root", 100 * KIB)
    a = v.pools.create(root.id, "a", 50 * KIB)
    b = v.pools.create(root.id, "b", 50 * KIB)
    target = v.media.create(a.id, "disk.img", size=10 * KIB)
    src = v.media.create(b.id, "disk.img.tmp", size=4 * KIB)
    assert v.media.rename(src.id, a.id, "disk.img") == target.id
    assert not os.path.exists(target.backing_path)
    assert os.path.exists(src.backing_path)
    raises_exactly(NotFound, v.media.get, target.id)
    now = v.media.get(src.id)
    assert (now.pool_id, now.name) == (a.id, "disk.img")
    assert [used(v, p.id) for p in (root, a, b)] == [4 * KIB, 4 * KIB, 0]

    # Replacing in the same pool (rsync's temp file then rename).
    tmp = v.media.create(a.id, ".disk.img.XYZ", size=6 * KIB)
    assert v.media.rename(tmp.id, a.id, "disk.img") == src.id
    assert [m.name for m in v.media.in_pool(a.id)] == ["disk.img"]
    assert used(v, a.id) == 6 * KIB

    # A replacement that does not fit even after the target's room is freed changes nothing.
    small = v.pools.create(root.id, "small", 10 * KIB)
    victim = v.media.create(small.id, "victim", size=2 * KIB)
    huge = v.media.create(b.id, "huge", size=11 * KIB)
    before = snapshot(v)
    raises_exactly(QuotaExceeded, v.media.rename, huge.id, small.id, "victim")
    assert snapshot(v) == before
    assert os.path.exists(victim.backing_path)
    assert_usage_consistent(v)


def test_removing_media_returns_its_size_and_grants(v: Velocity) -> None:
    root = v.pools.create(None, "root", 100 * KIB)
    a = v.pools.create(root.id, "a", None)
    m = v.media.create(a.id, "m", size=7 * KIB)
    keep = v.media.create(a.id, "keep", size=KIB)
    holder = v.ledger.register_holder()
    v.ledger.reserve(m.id, holder, 3 * KIB, chunk=3 * KIB)
    assert used(v, root.id) == 11 * KIB
    v.media.remove(m.id)
    assert not os.path.exists(m.backing_path)
    assert os.path.exists(keep.backing_path)
    assert [used(v, p.id) for p in (root, a)] == [KIB, KIB]
    assert grant_count(v) == 0
    raises_exactly(NotFound, v.media.remove, m.id)
    raises_exactly(NotFound, v.media.get, m.id)
    assert_usage_consistent(v)


def test_removing_pools(v: Velocity) -> None:
    root = v.pools.create(None, "root", 100 * KIB)
    other = v.pools.create(root.id, "other", None)
    kept = v.media.create(other.id, "kept", size=5 * KIB)
    t = v.pools.create(root.id, "t", 50 * KIB)
    x = v.pools.create(t.id, "x", None)
    y = v.pools.create(x.id, "y", 20 * KIB)
    in_t = v.media.create(t.id, "in-t", size=KIB)
    in_x = v.media.create(x.id, "in-x", size=2 * KIB)
    in_y = v.media.create(y.id, "in-y", size=3 * KIB)
    holder = v.ledger.register_holder()
    v.ledger.reserve(in_y.id, holder, 4 * KIB, chunk=4 * KIB)
    v.accounts.add_group("ops")
    v.accounts.share(x.id, "ops", [VIEW])
    v.xattrs.set(in_x.id, "user.note", b"hi")
    assert used(v, root.id) == 15 * KIB

    before = snapshot(v)
    raises_exactly(NotEmpty, v.pools.remove, t.id)  # subpools and media
    raises_exactly(NotEmpty, v.pools.remove, y.id)  # media only
    raises_exactly(NotEmpty, v.pools.remove, x.id)
    raises_exactly(NotFound, v.pools.remove, "no-such-pool")
    assert snapshot(v) == before
    empty = v.pools.create(y.id, "empty", None)
    v.pools.remove(empty.id)
    raises_exactly(NotFound, v.pools.get, empty.id)

    v.pools.remove(t.id, recursive=True)
    assert {p.id for p in v.pools.all()} == {root.id, other.id}
    assert [m.id for m in v.media.all()] == [kept.id]
    for gone in (in_t, in_x, in_y):
        assert not os.path.exists(gone.backing_path)
    assert os.path.exists(kept.backing_path)
    assert [used(v, p.id) for p in (root, other)] == [5 * KIB, 5 * KIB]
    assert grant_count(v) == 0
    assert v.accounts.shares_of_pool(x.id) == []
    assert v.xattrs.of(in_x.id) == {}
    assert_usage_consistent(v)
    # A removed root pool's name is free again.
    v.pools.remove(root.id, recursive=True)
    assert v.pools.all() == [] and v.media.all() == []
    v.pools.create(None, "root", KIB)


def test_a_pool_with_more_media_than_one_statement_may_bind_is_removed(v: Velocity) -> None:
    """The API's recursive DELETE of a big pool (PostgreSQL binds at most 65,535
    parameters in one statement, SQLite as built upstream 32,766)."""
    root = v.pools.create(None, "root", 1 << 30)
    images = v.pools.create(root.id, "images", None)
    ids = insert_media(v, images.id, size=1)
    with v.db.statements() as conn:
        charge(conn, v.chains.lock(conn, images.id)[0], len(ids))
    v.xattrs.set(ids[0], "user.note", b"hi")
    v.pools.remove(images.id, recursive=True)
    assert [p.id for p in v.pools.all()] == [root.id]
    assert v.media.all() == []
    assert v.xattrs.of(ids[0]) == {}
    assert used(v, root.id) == 0
    assert_usage_consistent(v)


def test_moving_a_pool_moves_its_usage_under_the_new_ancestors_rules(v: Velocity) -> None:
    root = v.pools.create(None, "root", 100 * KIB)
    a = v.pools.create(root.id, "a", 60 * KIB)
    b = v.pools.create(root.id, "b", 30 * KIB)
    s = v.pools.create(a.id, "s", None)
    deep = v.pools.create(s.id, "deep", 40 * KIB)
    v.media.create(deep.id, "m", size=10 * KIB)
    other_root = v.pools.create(None, "other", 100 * KIB)
    before = snapshot(v)
    raises_exactly(InvalidValue, v.pools.rename, root.id, other_root.id, "root")  # a root
    raises_exactly(InvalidValue, v.pools.rename, s.id, deep.id, "s")  # below itself
    raises_exactly(InvalidValue, v.pools.rename, s.id, s.id, "s")
    # s inherits, but its subpool's 40 KiB quota would exceed b's 30 KiB.
    raises_exactly(QuotaAboveAncestor, v.pools.rename, s.id, b.id, "s")
    assert snapshot(v) == before

    v.pools.rename(s.id, other_root.id, "moved")
    assert v.pools.path(deep.id) == "other/moved/deep"
    assert [used(v, p.id) for p in (root, a, other_root, s, deep)] == [0, 0] + [10 * KIB] * 3
    v.pools.set_quota(deep.id, 20 * KIB)
    v.media.create(b.id, "fill", size=25 * KIB)
    before = snapshot(v)
    raises_exactly(QuotaExceeded, v.pools.rename, s.id, b.id, "s")  # 35 KiB > 30 KiB
    assert snapshot(v) == before
    v.pools.rename(s.id, a.id, "back")
    assert [used(v, p.id) for p in (root, a, other_root)] == [35 * KIB, 10 * KIB, 0]
    assert_usage_consistent(v)


# -- accounts ----------------------------------------------------------------------------


def test_users_are_stored_with_argon2_hashes(v: Velocity) -> None:
    uid = v.accounts.add_user("alice", "correct horse")
    with v.db.transaction() as s:
        stored = s.execute(select(User.password_hash).where(User.id == uid)).scalar_one()
    assert stored.startswith("$argon2")
    assert "correct horse" not in stored
    raises_exactly(Conflict, v.accounts.add_user, "alice", "other")
    raises_exactly(InvalidValue, v.accounts.add_user, "bob", "")
    assert v.accounts.users() == [(uid, "alice")]
    assert v.accounts.login("alice", "correct horse").user_id == uid

    v.accounts.set_password("alice", "battery staple")
    raises_exactly(AuthenticationFailed, v.accounts.login, "alice", "correct horse")
    assert v.accounts.login("alice", "battery staple").user_id == uid
    raises_exactly(InvalidValue, v.accounts.set_password, "alice", "")
    raises_exactly(NotFound, v.accounts.set_password, "nobody", "pw")

    key = v.accounts.login("alice", "battery staple").authkey
    v.accounts.remove_user("alice")
    assert v.accounts.users() == []
    raises_exactly(AuthenticationFailed, v.accounts.login, "alice", "battery staple")
    raises_exactly(AuthenticationFailed, v.accounts.authenticate, key)  # keys go too
    raises_exactly(NotFound, v.accounts.remove_user, "alice")


def test_groups_and_members(v: Velocity) -> None:
    assert [name for _, name in v.accounts.groups()] == [ROOT_GROUP]  # made by init()
    v.init()  # harmless to repeat
    assert [name for _, name in v.accounts.groups()] == [ROOT_GROUP]
    gid = v.accounts.add_group("ops")
    raises_exactly(Conflict, v.accounts.add_group, "ops")
    assert v.accounts.group_id("ops") == gid
    assert v.accounts.group_id(gid) == gid
    alice = v.accounts.add_user("alice", "pw")
    v.accounts.add_user("bob", "pw")
    v.accounts.add_member("ops", "bob")
    v.accounts.add_member("ops", "alice")
    raises_exactly(Conflict, v.accounts.add_member, "ops", "alice")
    raises_exactly(NotFound, v.accounts.add_member, "ops", "nobody")
    raises_exactly(NotFound, v.accounts.add_member, "nogroup", "alice")
    assert v.accounts.members("ops") == ["alice", "bob"]
    assert v.accounts.group_ids_of(alice) == {gid}
    v.accounts.remove_member("ops", "alice")
    raises_exactly(NotFound, v.accounts.remove_member, "ops", "alice")
    assert v.accounts.members("ops") == ["bob"]
    raises_exactly(InvalidValue, v.accounts.remove_group, ROOT_GROUP)
    v.accounts.remove_group("ops")
    raises_exactly(NotFound, v.accounts.remove_group, "ops")
    raises_exactly(NotFound, v.accounts.members, "ops")
    assert [name for _, name in v.accounts.groups()] == [ROOT_GROUP]


def test_shares_grant_permissions_on_a_pools_subtree_only(v: Velocity) -> None:
    tenants = v.pools.create(None, "tenants", MIB)
    acme = v.pools.create(tenants.id, "acme", None)
    web = v.pools.create(acme.id, "web", None)
    deep = v.pools.create(web.id, "deep", None)
    globex = v.pools.create(tenants.id, "globex", None)
    isos = v.pools.create(None, "isos", MIB)
    alice = v.accounts.add_user("alice", "pw")
    carol = v.accounts.add_user("carol", "pw")
    admin = v.accounts.add_user("admin", "pw")
    loner = v.accounts.add_user("loner", "pw")
    v.accounts.add_group("ops")
    v.accounts.add_group("devs")
    v.accounts.add_member("ops", "alice")
    v.accounts.add_member("ops", "carol")
    v.accounts.add_member("devs", "carol")
    v.accounts.add_member(ROOT_GROUP, "admin")

    shared = v.accounts.share(acme.id, "ops", [VIEW, MEDIA_READ, VIEW])
    assert shared.permissions == sorted([VIEW, MEDIA_READ])
    v.accounts.share(tenants.id, "devs", [CREATE])
    for pool in (acme, web, deep):
        assert v.accounts.permissions_on(alice, pool.id) == {VIEW, MEDIA_READ}
    for pool in (tenants, globex, isos):  # parents and siblings get nothing
        assert v.accounts.permissions_on(alice, pool.id) == set()
    # Through any group: carol has ops' share on acme plus devs' on all of tenants.
    assert v.accounts.permissions_on(carol, web.id) == {VIEW, MEDIA_READ, CREATE}
    assert v.accounts.permissions_on(carol, globex.id) == {CREATE}
    assert v.accounts.permissions_on(carol, isos.id) == set()
    assert MEDIA_READ in v.accounts.permissions_on(alice, deep.id)
    assert MEDIA_WRITE not in v.accounts.permissions_on(alice, deep.id)
    assert VIEW not in v.accounts.permissions_on(alice, globex.id)
    # The root group may do everything, everywhere, without any share.
    for pool in (tenants, acme, deep, globex, isos):
        assert v.accounts.permissions_on(admin, pool.id) == set(PERMISSIONS)
        assert v.accounts.permissions_on(loner, pool.id) == set()
    with v.db.transaction() as s:
        assert caller_of(s, admin).is_root and not caller_of(s, alice).is_root

    # Unknown permissions are refused and leave the share as it was.
    raises_exactly(InvalidValue, v.accounts.share, acme.id, "ops", [VIEW, "velocity.pool.fly"])
    raises_exactly(InvalidValue, v.accounts.share, acme.id, "ops", ["view"])
    raises_exactly(NotFound, v.accounts.share, "no-such-pool", "ops", [VIEW])
    raises_exactly(NotFound, v.accounts.share, acme.id, "nogroup", [VIEW])
    assert v.accounts.permissions_on(alice, web.id) == {VIEW, MEDIA_READ}
    # A new share replaces the old one; an empty one removes it.
    v.accounts.share(acme.id, "ops", [MEDIA_WRITE])
    assert v.accounts.permissions_on(alice, web.id) == {MEDIA_WRITE}
    assert v.accounts.share(acme.id, "ops", []).permissions == []
    assert v.accounts.permissions_on(alice, web.id) == set()
    assert [s.group_id for s in v.accounts.shares_of_pool(tenants.id)] == [
        v.accounts.group_id("devs")
    ]
    # Leaving the group, or the group going away, takes the permissions along.
    v.accounts.share(acme.id, "ops", [VIEW])
    v.accounts.remove_member("ops", "carol")
    assert v.accounts.permissions_on(carol, web.id) == {CREATE}
    v.accounts.remove_group("devs")
    assert v.accounts.permissions_on(carol, web.id) == set()
    assert v.accounts.shares_of_pool(tenants.id) == []
    v.accounts.share(acme.id, "ops", list(PERMISSIONS))
    assert v.accounts.permissions_on(alice, deep.id) == set(PERMISSIONS)


def test_authkeys(catalog_url: str, store_dir: Path, v: Velocity) -> None:
    uid = v.accounts.add_user("alice", "pw")
    issued = v.accounts.login("alice", "pw")
    assert issued.user_id == uid
    assert issued.expires_ns > time.time_ns() + 3000 * 10**9  # the default hour
    assert v.accounts.authenticate(issued.authkey) == uid
    raises_exactly(AuthenticationFailed, v.accounts.login, "alice", "wrong")
    raises_exactly(AuthenticationFailed, v.accounts.login, "nobody", "pw")
    raises_exactly(AuthenticationFailed, v.accounts.authenticate, "")
    raises_exactly(AuthenticationFailed, v.accounts.authenticate, "made-up")
    raises_exactly(AuthenticationFailed, v.accounts.authenticate, issued.authkey + "x")

    # Stored hashed: the plain key appears nowhere in the authkeys table.
    with v.db.transaction() as s:
        rows = [tuple(r) for r in s.execute(select(AuthKey.__table__))]
    assert rows
    assert not any(issued.authkey in str(col) for row in rows for col in row)
    assert hashlib.sha256(issued.authkey.encode()).hexdigest() in {r[2] for r in rows}

    # Expiry: keys issued with a 1 s lifetime stop working after it; a renewed one lives on.
    short = Velocity(catalog_url, store_dir, authkey_lifetime_s=1)
    dying = short.accounts.login("alice", "pw")
    renewed = short.accounts.login("alice", "pw")
    assert short.accounts.authenticate(dying.authkey) == uid
    longer = v.accounts.renew(renewed.authkey)  # v issues with the default lifetime
    assert longer.expires_ns > renewed.expires_ns + 3000 * 10**9
    time.sleep(1.2)
    raises_exactly(AuthenticationFailed, short.accounts.authenticate, dying.authkey)
    raises_exactly(AuthenticationFailed, v.accounts.renew, dying.authkey)
    raises_exactly(AuthenticationFailed, v.accounts.drop, dying.authkey)
    assert v.accounts.authenticate(renewed.authkey) == uid
    short.close()
    instant = Velocity(catalog_url, store_dir, authkey_lifetime_s=0)
    expired = instant.accounts.login("alice", "pw")
    raises_exactly(AuthenticationFailed, instant.accounts.authenticate, expired.authkey)
    instant.close()

    # Drop makes a key invalid at once, and only that key.
    v.accounts.drop(renewed.authkey)
    raises_exactly(AuthenticationFailed, v.accounts.authenticate, renewed.authkey)
    raises_exactly(AuthenticationFailed, v.accounts.drop, renewed.authkey)
    assert v.accounts.authenticate(issued.authkey) == uid
    # A new password ends every session of the user.
    v.accounts.set_password("alice", "new")
    raises_exactly(AuthenticationFailed, v.accounts.authenticate, issued.authkey)
