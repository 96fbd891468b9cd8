"""Schema migrations, run programmatically (no alembic.ini): `upgrade(store)` brings a database to the newest schema.

Every model change comes with a revision in `migrations/versions/`. To write one, change `models.py`, then run
`python -m controller.store.migrate revision -m "what changed"` against a database at the current head and
review the generated file (autogenerate misses CHECK constraint changes and renames).

Concurrent upgrades are safe: on PostgreSQL the migration holds a transaction-scoped advisory lock, on SQLite the
`BEGIN IMMEDIATE` write lock, so a second controller starting at the same time waits and then finds nothing to do.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from .models import Base
from .session import Store, StoreConfig, open_store

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# An arbitrary constant naming vlctl's migration lock among PostgreSQL advisory locks.
_PG_MIGRATION_LOCK = 0x766C63746C


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS_DIR}"
    return head


def upgrade(store: Store, revision: str = "head") -> None:
    _run(store, lambda config: command.upgrade(config, revision))


def downgrade(store: Store, revision: str) -> None:
    _run(store, lambda config: command.downgrade(config, revision))


def current_revision(store: Store) -> str | None:
    with store.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def schema_differences(store: Store) -> list[object]:
    """What autogenerate would change to make the database match the models; [] when they agree."""
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def _run(store: Store, step: Callable[[Config], object]) -> None:
    config = alembic_config()
    with store.transaction() as session:
        connection = session.connection()
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = connection
        step(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m controller.store.migrate", description=__doc__)
    parser.add_argument("--url", help="database URL (default: VLCTL_DATABASE_URL, else the SQLite file)")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("upgrade", help="upgrade to the newest schema")
    sub.add_parser("current", help="print the database's revision")
    new = sub.add_parser("revision", help="autogenerate a revision from the models")
    new.add_argument("-m", "--message", required=True)
    args = parser.parse_args(argv)

    store = open_store(StoreConfig(url=args.url))
    try:
        if args.action == "upgrade":
            upgrade(store)
        elif args.action == "current":
            print(current_revision(store))
        else:
            config = alembic_config()
            with store.engine.begin() as connection:
                config.attributes["connection"] = connection
                command.revision(config, message=args.message, autogenerate=True)
    finally:
        store.dispose()


if __name__ == "__main__":
    main()
