"""Create or upgrade a catalog to the newest Alembic revision."""

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(engine: Engine) -> Config:
    """An Alembic config bound to ``engine`` without an alembic.ini on disk."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def revisions(engine: Engine) -> tuple[str | None, str]:
    """The catalog's current revision (None before ``init``) and the newest one we know."""
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    assert head is not None
    return current, head


def upgrade(engine: Engine) -> None:
    """Bring the schema to head; harmless when it already is."""
    command.upgrade(alembic_config(engine), "head")
