"""Usage of every pool recomputed from first principles, to check the ledger against.

The ledger keeps ``Pool.used_bytes`` incrementally; these helpers recompute it by
walking the whole catalog (media sizes plus outstanding grants in each subtree), which
is exactly the scan the ledger exists to avoid, and so an independent reference.
"""

from __future__ import annotations

from sqlalchemy import func, select

from velocityfs.catalog.models import Grant, Media, Pool
from velocityfs.service.velocity import Velocity


def expected_usage(v: Velocity) -> dict[str, int]:
    """pool id -> settled media sizes plus grants in the pool's whole subtree."""
    with v.db.transaction() as s:
        parents = dict(s.execute(select(Pool.id, Pool.parent_id)).all())
        direct = dict.fromkeys(parents, 0)
        for pool_id, size in s.execute(select(Media.pool_id, Media.size)):
            direct[pool_id] += size
        for pool_id, nbytes in s.execute(select(Grant.pool_id, Grant.bytes)):
            direct[pool_id] += nbytes
    usage = dict.fromkeys(parents, 0)
    for pool_id, nbytes in direct.items():
        current: str | None = pool_id
        while current is not None:
            usage[current] += nbytes
            current = parents[current]
    return usage


def recorded_usage(v: Velocity) -> dict[str, int]:
    """pool id -> ``used_bytes`` as the ledger maintains it."""
    return {p.id: p.used_bytes for p in v.pools.all()}


def assert_usage_consistent(v: Velocity) -> None:
    """Every pool's maintained usage equals the recomputed one, and fits its quota."""
    recorded = recorded_usage(v)
    expected = expected_usage(v)
    names = {p.id: v.pools.path(p.id) for p in v.pools.all()}
    wrong = {
        names[pid]: (recorded[pid], expected[pid])
        for pid in recorded
        if recorded[pid] != expected[pid]
    }
    assert not wrong, f"used_bytes (recorded, recomputed) differ: {wrong}"
    over = [
        (names[p.id], p.used_bytes, p.quota_bytes)
        for p in v.pools.all()
        if p.quota_bytes is not None and p.used_bytes > p.quota_bytes
    ]
    assert not over, f"pools over quota: {over}"


def grant_count(v: Velocity) -> int:
    with v.db.transaction() as s:
        return s.execute(select(func.count()).select_from(Grant)).scalar_one()
