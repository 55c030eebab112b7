"""Alembic environment for Distillery's storage.

Normally run programmatically by :func:`storage.db.run_migrations`, which hands
over an open connection (``config.attributes["connection"]``) already inside a
locked transaction.  When run from the ``alembic`` CLI it builds its own engine
from ``sqlalchemy.url`` or ``$DISTILLERY_DB_URL`` with the same SQLite PRAGMAs.
"""

from __future__ import annotations

from alembic import context

from storage.db import default_db_url, make_engine
from storage.schema import metadata

config = context.config


def _configure_and_run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode lets future migrations work there.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade head --sql``)."""
    url = config.get_main_option("sqlalchemy.url") or default_db_url()
    context.configure(url=url, target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Use the caller's connection when given, otherwise open one."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or default_db_url()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _configure_and_run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
