"""Alembic's environment for the store, driven from `controller.store.migrate` (there is no alembic.ini).

The caller passes an open connection in `config.attributes["connection"]` and owns its transaction; without
one (`alembic` run by hand with a `sqlalchemy.url`), this opens an engine for that URL.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from controller.store.tables import UTCDateTime, metadata


def _render_item(kind: str, obj: object, _context: object) -> str | bool:
    # Revisions stay frozen: they spell plain SQLAlchemy types, never import the models.
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        render_item=_render_item,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
elif (connection := context.config.attributes.get("connection")) is not None:
    _run(connection)
else:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()
