"""The Alembic history builds exactly the schema the models describe, on both catalogs."""

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from velocityfs.catalog.models import Base
from velocityfs.service.velocity import Velocity


def test_migrations_match_models(catalog_url: str, store_dir: Path) -> None:
    v = Velocity(catalog_url, store_dir)
    v.init()
    with v.db.engine.connect() as conn:
        drift = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    assert drift == []
    assert revision == "0006"
    v.close()


def test_init_twice_keeps_data(catalog_url: str, store_dir: Path) -> None:
    v = Velocity(catalog_url, store_dir)
    v.init()
    pool = v.pools.create(None, "tenants", 1 << 20)
    v.init()
    assert v.pools.get(pool.id).name == "tenants"
    assert inspect(v.db.engine).has_table("removals")
    assert [g for _gid, g in v.accounts.groups()] == ["root"]
    v.close()
