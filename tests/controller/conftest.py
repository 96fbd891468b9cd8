"""Database fixtures for the store's tests: every test runs on SQLite and on the local PostgreSQL.

- `empty_db_url`: the URL of an empty database, per test: a fresh SQLite file, or a fresh PostgreSQL schema
  (selected through `search_path`) that is dropped afterwards. Parametrized over both backends.
- `migrated_store`: an open `Store` on `empty_db_url`, upgraded to the newest schema.
- `postgres_only_url`: like `empty_db_url`, PostgreSQL alone (tests of row-locking behaviour).

PostgreSQL is `VLCTL_TEST_POSTGRES_URL` (default: trust auth on 127.0.0.1:5432, database `test`). Its tests are
skipped, with the reason, only when that server cannot be reached; `VLCTL_REQUIRE_POSTGRES=1` (CI) turns the
skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from controller.store import Store, StoreConfig, open_store
from controller.store.migrate import upgrade
from controller.store.session import safe_url

POSTGRES_URL = os.environ.get("VLCTL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The test server's URL, after checking once that it answers."""
    engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as err:
        reason = f"PostgreSQL at {safe_url(POSTGRES_URL)} is unreachable: {str(err.orig).splitlines()[0]}"
        if os.environ.get("VLCTL_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    finally:
        engine.dispose()
    return POSTGRES_URL


def _fresh_postgres_schema(admin_url: str) -> Iterator[str]:
    schema = f"vlctl_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        # Asynchronous commit spares the tests an fsync per transaction; it changes nothing they can observe.
        options = f"-csearch_path={schema} -csynchronous_commit=off"
        yield (
            make_url(admin_url).update_query_dict({"options": options}).render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'vlctl.db'}"
    else:
        yield from _fresh_postgres_schema(request.getfixturevalue("postgres_admin_url"))


@pytest.fixture
def postgres_only_url(postgres_admin_url: str) -> Iterator[str]:
    yield from _fresh_postgres_schema(postgres_admin_url)


@pytest.fixture
def migrated_store(empty_db_url: str) -> Iterator[Store]:
    store = open_store(StoreConfig(url=empty_db_url))
    upgrade(store)
    try:
        yield store
    finally:
        store.dispose()
