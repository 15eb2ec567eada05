"""Statements run on the driver's cursor do what ``Connection.execute`` would, or refuse."""

import time
from pathlib import Path

import pytest
from sqlalchemy import (
    Column,
    Dialect,
    MetaData,
    Numeric,
    String,
    Table,
    TupleType,
    TypeDecorator,
    bindparam,
    cast,
    func,
    insert,
    select,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

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
    assert before is not None
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
    literal = Prepared(
        select(POOLS.c.id).where(POOLS.c.name == bindparam("n", literal_execute=True))
    )
    with pytest.raises(NotPreparable, match="literal-execute"), velocity.db.statements() as conn:
        literal.execute(conn, {"n": "a"})
    escaped = Prepared(select(POOLS.c.id).where(POOLS.c.name == bindparam("a name")))
    with pytest.raises(NotPreparable, match="escapes"), velocity.db.statements() as conn:
        escaped.execute(conn, {"a name": "a"})
    pair = TupleType(String(), String())
    tupled = Prepared(
        select(POOLS.c.id).where(tuple_(POOLS.c.id, POOLS.c.name) == bindparam("t", type_=pair))
    )
    with pytest.raises(NotPreparable, match="tuple"), velocity.db.statements() as conn:
        tupled.execute(conn, {"t": ("a", "b")})
    # Without RETURNING, SQLAlchemy runs a key's SQL default before the INSERT.
    keyed = Table(
        "grants",
        MetaData(),
        Column("id", String(36), primary_key=True, default=func.lower("G")),
        Column("holder_id", String(36)),
        implicit_returning=False,
    )
    add = Prepared(insert(keyed).values(holder_id=bindparam("h")))
    with pytest.raises(NotPreparable, match="run in SQL"), velocity.db.statements() as conn:
        add.execute(conn, {"h": "h"})


class _Lower(TypeDecorator[str]):
    """A type with a bind processor: what is sent is lower-cased."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else value.lower()


class _Shout(TypeDecorator[str]):
    """A type with a result processor: what is read is upper-cased."""

    impl = String
    cache_ok = True

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else value.upper()


def test_bind_processors_are_applied(velocity: Velocity) -> None:
    """Both to values given per call and to values fixed in the statement."""
    pool = velocity.pools.create(None, "tenants", 1 << 30)
    by_name = Prepared(select(POOLS.c.id).where(POOLS.c.name == bindparam("n", type_=_Lower)))
    fixed = Prepared(
        select(POOLS.c.id).where(POOLS.c.name == bindparam("n", "TENANTS", type_=_Lower))
    )
    with velocity.db.statements() as conn:
        assert by_name.execute(conn, {"n": "TeNaNtS"}).fetchall() == [(pool.id,)]
        assert fixed.execute(conn, {}).fetchall() == [(pool.id,)]
        assert conn.execute(by_name.statement, {"n": "TeNaNtS"}).all() == [(pool.id,)]


def test_python_defaults_are_computed_per_insert(velocity: Velocity) -> None:
    """grants.id (a callable) and grants.bytes (a constant) are left to their defaults."""
    pool = velocity.pools.create(None, "tenants", 1 << 30)
    given = ("pool_id", "media_id", "holder_id", "created_ns")
    add = Prepared(insert(GRANTS).values({key: bindparam(key) for key in given}))
    row = {"pool_id": pool.id, "media_id": None, "holder_id": "h", "created_ns": 5}
    with velocity.db.statements() as conn:
        add.execute(conn, row)
        add.execute(conn, row)
    with velocity.db.statements() as conn:
        rows = conn.execute(select(GRANTS.c.id, GRANTS.c.bytes)).all()
    assert len({gid for gid, _bytes in rows}) == 2
    assert all(len(gid) == 36 for gid, _bytes in rows)
    assert [nbytes for _gid, nbytes in rows] == [0, 0]


def test_a_default_that_reads_the_execution_context_is_refused(velocity: Velocity) -> None:
    """There is no execution context to give it; it must not get a stand-in quietly."""
    table = Table(
        "grants",
        MetaData(),
        Column("id", String(36), primary_key=True),
        Column("holder_id", String(36), default=lambda ctx: ctx.get_current_parameters()["id"]),
    )
    add = Prepared(insert(table).values(id=bindparam("id")))
    with pytest.raises(NotPreparable, match="execution context"), velocity.db.statements() as conn:
        add.execute(conn, {"id": "g1"})


def test_results_that_need_processing_are_refused(velocity: Velocity) -> None:
    shouted = Prepared(select(type_coerce(POOLS.c.name, _Shout)))
    with pytest.raises(NotPreparable, match="result column"), velocity.db.statements() as conn:
        shouted.execute(conn, {})
    # SQLite's Numeric converts to Decimal; psycopg's depends on the type code it reports.
    numeric = Prepared(select(cast(POOLS.c.used_bytes, Numeric(20, 2))))
    with pytest.raises(NotPreparable, match="result column"), velocity.db.statements() as conn:
        numeric.execute(conn, {})
    returned = Prepared(
        update(POOLS).values(mode=0o700).returning(type_coerce(POOLS.c.name, _Shout))
    )
    with pytest.raises(NotPreparable, match="result column"), velocity.db.statements() as conn:
        returned.execute(conn, {})


def test_the_cursor_iterates_over_rows(velocity: Velocity) -> None:
    a = velocity.pools.create(None, "a", 1 << 30)
    b = velocity.pools.create(None, "b", 1 << 30)
    names = Prepared(select(POOLS.c.id).order_by(POOLS.c.name))
    with velocity.db.statements() as conn:
        assert [row[0] for row in names.execute(conn, {})] == [a.id, b.id]


def test_a_connection_outside_a_transaction_begins_one(velocity: Velocity) -> None:
    """As Connection.execute would: on SQLite the driver would otherwise commit at once."""
    pool = velocity.pools.create(None, "tenants", 1 << 30)
    grow = Prepared(
        update(POOLS)
        .where(POOLS.c.id == bindparam("pid"))
        .values(used_bytes=POOLS.c.used_bytes + bindparam("delta"))
    )
    with velocity.db.engine.connect() as conn:
        grow.execute(conn, {"pid": pool.id, "delta": 4096})
        assert conn.in_transaction()
        conn.rollback()
    with velocity.db.statements() as conn:
        used = conn.execute(select(POOLS.c.used_bytes).where(POOLS.c.id == pool.id)).scalar()
    assert used == 0


@pytest.mark.parametrize("catalog_url", ["postgresql"], indirect=True)
def test_a_lost_connection_is_invalidated(velocity: Velocity) -> None:
    read = Prepared(select(POOLS.c.id))
    with pytest.raises(DBAPIError) as caught, velocity.db.statements() as conn:
        backend = conn.execute(select(func.pg_backend_pid())).scalar()
        with velocity.db.engine.connect() as other:
            other.execute(select(func.pg_terminate_backend(backend)))
        try:
            read.execute(conn, {})
        finally:
            invalidated = conn.invalidated
    assert caught.value.connection_invalidated
    assert invalidated
    with velocity.db.statements() as conn:
        assert read.execute(conn, {}).fetchall() == []
