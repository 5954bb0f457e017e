"""Alembic environment: the URL comes from tileseg's settings (or the Config that `core.db` builds)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool, text

from core.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


#: Key of the PostgreSQL advisory lock that serialises migrations (any constant; "tileseg" in ASCII).
_PG_LOCK_KEY = 0x74696C65736567


@contextmanager
def _sqlite_lock(connection: Connection) -> Iterator[None]:
    """An exclusive file lock beside a SQLite database for the whole migration.

    In embedded mode the api, the worker and every CLI command upgrade the schema when they start; two that
    start together would both see an empty database and both create the tables ("table jobs already exists").
    """
    db = connection.engine.url.database
    if connection.dialect.name != "sqlite" or not db or db == ":memory:":
        yield
        return
    with open(Path(db).with_name(Path(db).name + ".migrate-lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_migrations_online() -> None:
    connectable = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                     poolclass=pool.NullPool)
    with connectable.connect() as connection:
        # render_as_batch: SQLite cannot ALTER most things; batch mode recreates tables there.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with _sqlite_lock(connection), context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Held to the end of the transaction (PostgreSQL migrates in one): a second `db upgrade`
                # waits here, then reads the version the first one committed.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
