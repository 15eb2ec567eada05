"""Statements run on the driver's cursor do what ``Connection.execute`` would, or refuse."""

import time
from pathlib import Path

import pytest
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from velocityfs.catalog.models import Grant, Pool
from velocityfs.catalog.prepared import NotPreparable, Prepared
from velocityfs.service.velocity import Velocity

POOLS = Pool.__table__
GRANTS = Grant.__table__


@pytest.fixture
def velocity(catalog_url: str, store_dir: Path):  # type: ignore[no-untyped-def]
    v = Velocity(catalog_url, store_dir)
    v.init()
    yield v
    v.close()


def test_an_update_sets_the_onupdate_columns(velocity: Velocity) -> None:
    """changed_ns is how other mounts learn of a change: it must move on every update."""
    pool = velocity.pools.create(None, "tenants", 1 << 30)
    grow = Prepared(
        update(POOLS)
        .where(POOLS.c.id == bindparam("pid"))
        .values(used_bytes=POOLS.c.used_bytes + bindparam("delta"))
    )
    with velocity.db.statements() as conn:
        before = conn.execute(select(POOLS.c.changed_ns).where(POOLS.c.id == pool.id)).scalar()
    started = time.time_ns()
    with velocity.db.statements() as conn:
        assert grow.execute(conn, {"pid": pool.id, "delta": 4096}).rowcount == 1
    with velocity.db.statements() as conn:
        used, changed = conn.execute(
            select(POOLS.c.used_bytes, POOLS.c.changed_ns).where(POOLS.c.id == pool.id)
        ).one()
    assert used == 4096
    assert changed >= started > before


def test_values_fixed_in_the_statement_are_sent(velocity: Velocity) -> None:
    pool = velocity.pools.create(None, "tenants", 1 << 30)
    held = Prepared(
        select(func.coalesce(func.sum(GRANTS.c.bytes), 7)).where(
            GRANTS.c.pool_id == bindparam("pid")
        )
    )
    with velocity.db.statements() as conn:
        assert held.execute(conn, {"pid": pool.id}).fetchone() == (7,)


def test_a_missing_value_is_refused_before_the_database_sees_it(velocity: Velocity) -> None:
    pool = velocity.pools.create(None, "tenants", 1 << 30)
    add = Prepared(insert(GRANTS))
    row = {"id": "g1", "pool_id": pool.id, "media_id": None, "holder_id": "h", "bytes": 1}
    with pytest.raises(KeyError, match="created_ns"), velocity.db.statements() as conn:
        add.execute(conn, row)
    with velocity.db.statements() as conn:
        assert conn.execute(select(func.count()).select_from(GRANTS)).scalar() == 0


def test_a_driver_error_is_sqlalchemys_and_rolls_back(velocity: Velocity) -> None:
    pool = velocity.pools.create(None, "tenants", 1 << 30)
    add = Prepared(insert(GRANTS))
    row = {
        "id": "g1",
        "pool_id": pool.id,
        "media_id": None,
        "holder_id": "h",
        "bytes": 1,
        "created_ns": 0,
    }
    with pytest.raises(IntegrityError), velocity.db.statements() as conn:
        add.execute(conn, {**row, "id": "g0"})
        add.execute(conn, row)
        add.execute(conn, row)
    with velocity.db.statements() as conn:
        assert conn.execute(select(func.count()).select_from(GRANTS)).scalar() == 0
        add.execute(conn, row)
    with velocity.db.statements() as conn:
        assert conn.execute(select(GRANTS.c.id)).scalars().all() == ["g1"]


def test_what_it_cannot_run_faithfully_is_refused(velocity: Velocity) -> None:
    expanding = Prepared(select(POOLS.c.id).where(POOLS.c.id.in_(bindparam("ids", expanding=True))))
    with pytest.raises(NotPreparable, match="expanding"), velocity.db.statements() as conn:
        expanding.execute(conn, {"ids": ["a"]})
    computed = Prepared(select(POOLS.c.id).where(POOLS.c.name == bindparam("n", callable_=str)))
    with pytest.raises(NotPreparable, match="computed"), velocity.db.statements() as conn:
        computed.execute(conn, {})
