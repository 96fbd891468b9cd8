"""A fresh PostgreSQL schema per CLI test, shared by the CLI test modules (the store's own fixtures live in
tests/controller/conftest.py). Skipped when the server cannot be reached, a failure in CI
(`VLCTL_REQUIRE_POSTGRES=1`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

POSTGRES_URL = os.environ.get("VLCTL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema on the test server, dropped afterwards; skips (fails in CI) when the server is unreachable."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    schema = f"vlctl_cli_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as err:
        admin.dispose()
        reason = f"PostgreSQL is unreachable: {str(err.orig).splitlines()[0]}"
        if os.environ.get("VLCTL_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        options = f"-csearch_path={schema} -csynchronous_commit=off"
        yield (
            make_url(POSTGRES_URL)
            .update_query_dict({"options": options})
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
