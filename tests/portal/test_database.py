"""The Alembic migrations create exactly the schema the models describe, on a fresh SQLite database and on a fresh
database of a real PostgreSQL server, and upgrading twice is harmless."""
from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from rafmedia.portal.db import Base, alembic_config, make_engine, upgrade
from tests.portal.postgres import backend_url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_match_the_models(backend, tmp_path):
    url = backend_url(backend, tmp_path)
    engine = make_engine(url)
    upgrade(engine)
    upgrade(engine)  # idempotent: nothing left to apply
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                       Base.metadata)
        applied = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert differences == []
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) | {"alembic_version"} == tables
    assert applied == [ScriptDirectory.from_config(alembic_config(url)).get_current_head()]
    engine.dispose()
