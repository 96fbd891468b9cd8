"""Schema migrations, run programmatically (no alembic.ini): `upgrade(store)` brings a database to the newest schema.

Every model change comes with a revision in `migrations/versions/`. To write one, change `models.py`, then run
`python -m controller.store.migrate revision -m "what changed"` against a database at the current head and
review the generated file (autogenerate misses CHECK constraint changes and renames).

Concurrent upgrades are safe: on PostgreSQL the migration holds a transaction-scoped advisory lock, on SQLite the
`BEGIN IMMEDIATE` write lock, so a second controller starting at the same time waits and then finds nothing to do.

Every CLI command upgrades the store first, so the usual case, a database already at the newest schema, is
answered without Alembic: one read of `alembic_version`, compared with the head found by reading the revision
files' `revision`/`down_revision` lines (`head_revision`; a test checks it against Alembic's own answer). Alembic
is imported, for its 0.3 s of CPU, only when there is something to do.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from .session import Store, StoreConfig, open_store
from .tables import metadata

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# An arbitrary constant naming vlctl's migration lock among PostgreSQL advisory locks.
_PG_MIGRATION_LOCK = 0x766C63746C


_REVISION_LINE = re.compile(r"^(revision|down_revision)\s*(?::[^=]*)?=\s*(.+)$", re.MULTILINE)


def alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@functools.cache
def head_revision() -> str:
    """The newest revision: the one no other revision names as its `down_revision` (the history is linear)."""
    revisions: dict[str, str | None] = {}
    for path in sorted((MIGRATIONS_DIR / "versions").glob("*.py")):
        found = dict((key, value.strip()) for key, value in _REVISION_LINE.findall(path.read_text()))
        if "revision" not in found:
            continue
        down = found.get("down_revision", "None")
        revisions[found["revision"].strip("\"'")] = None if down == "None" else down.strip("\"'")
    heads = set(revisions) - {d for d in revisions.values() if d is not None}
    assert len(heads) == 1, f"expected one head revision in {MIGRATIONS_DIR}, found {sorted(heads)}"
    return heads.pop()


def upgrade(store: Store, revision: str = "head") -> None:
    if revision == "head" and _stored_revision(store) == head_revision():
        return
    from alembic import command

    _run(store, lambda config: command.upgrade(config, revision))


def downgrade(store: Store, revision: str) -> None:
    from alembic import command

    _run(store, lambda config: command.downgrade(config, revision))


def _stored_revision(store: Store) -> str | None:
    """The database's revision read directly, or None (no schema yet, or it cannot be read this way)."""
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    except DBAPIError:  # no alembic_version table: a new database
        return None
    return rows[0][0] if len(rows) == 1 else None


def current_revision(store: Store) -> str | None:
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def schema_differences(store: Store) -> list[object]:
    """What autogenerate would change to make the database match the models; [] when they agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


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
            from alembic import command

            config = alembic_config()
            with store.engine.begin() as connection:
                config.attributes["connection"] = connection
                command.revision(config, message=args.message, autogenerate=True)
    finally:
        store.dispose()


if __name__ == "__main__":
    main()
