"""Alembic environment of the portal database: runs on the connection `rafmedia.portal.db.upgrade` hands over,
or on `sqlalchemy.url` when alembic is run by hand (`alembic -c ... upgrade head`)."""
from alembic import context
from sqlalchemy import engine_from_config, pool

from rafmedia.portal.db import Base

config = context.config
connection = config.attributes.get("connection")
if connection is not None:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as own:
        context.configure(connection=own, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
