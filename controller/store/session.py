"""Where the store lives and how to open transactions on it.

Decisions:
- The URL: `VLCTL_DATABASE_URL` when set, else SQLite in the user's data folder
  (`$XDG_DATA_HOME/vlctl/vlctl.db`, default `~/.local/share/vlctl/vlctl.db`). `postgresql://` and `postgres://`
  mean psycopg 3 (`postgresql+psycopg://`), the only PostgreSQL driver installed.
- SQLite runs in WAL mode (readers never block the writer), with foreign keys on (they are off by default, and
  the schema relies on `ON DELETE CASCADE`) and a busy timeout so a writer waits for another instead of failing.
  `synchronous=NORMAL`: in WAL mode a commit survives the process being killed (the case the controller must
  handle) and the database never corrupts; only a power loss may drop the last commits, for one fsync fewer per
  transaction.
  pysqlite's own transaction handling is switched off and SQLAlchemy emits `BEGIN` itself, so that write
  transactions can be `BEGIN IMMEDIATE`: they take the single writer lock at the start, which makes
  read-then-write sequences (claims, transitions) atomic and avoids the deadlock-like `SQLITE_BUSY` a deferred
  transaction gets when it upgrades from reading to writing.
- `Store.transaction()` is the unit of work: it commits when the block ends and rolls back when it raises.
  Functions that receive a session never commit; the caller owns the transaction.
- A database that cannot be reached raises `StoreUnavailable` naming the URL without its password, whether at
  `open_store` or on a later connect (a restarted server, a deleted folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection, ExceptionContext
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.pool import ConnectionPoolEntry

if TYPE_CHECKING:  # the ORM is imported by the first session, not by code that only reads rows
    from sqlalchemy.orm import Session, sessionmaker

DATABASE_URL_ENV = "VLCTL_DATABASE_URL"
_BEGIN_OPTION = "vlctl_sqlite_begin"


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or opened; `url` is the URL with its password hidden."""

    def __init__(self, url: str, cause: str):
        super().__init__(f"cannot reach the database at {url}: {cause}")
        self.url = url


def default_database_url(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    data_home = Path(env.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{data_home / 'vlctl' / 'vlctl.db'}"


def resolve_database_url(url: str | None = None, env: dict[str, str] | None = None) -> URL:
    """The URL to use: `url`, else `VLCTL_DATABASE_URL`, else the default SQLite file."""
    env = dict(os.environ) if env is None else env
    raw = url or env.get(DATABASE_URL_ENV) or default_database_url(env)
    try:
        parsed = make_url(raw)
    except ArgumentError as err:
        raise ValueError(f"{DATABASE_URL_ENV}: not a database URL: {raw!r}") from err
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"{DATABASE_URL_ENV}: unsupported database {parsed.drivername!r}; use sqlite or postgresql"
        )
    return parsed


def safe_url(url: URL | str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@dataclass(kw_only=True, slots=True)
class StoreConfig:
    url: str | None = None  # None: resolve_database_url()
    busy_timeout_s: float = 30.0  # SQLite: how long a writer waits for the write lock
    connect_timeout_s: int = 5  # PostgreSQL: how long connecting may take before StoreUnavailable
    echo: bool = False

    def __post_init__(self) -> None:
        if self.busy_timeout_s <= 0:
            raise ValueError(f"busy_timeout_s: must be > 0, got {self.busy_timeout_s}")
        if self.connect_timeout_s < 1:
            raise ValueError(f"connect_timeout_s: must be >= 1, got {self.connect_timeout_s}")


class Store:
    """An engine and its sessions. Open with `open_store`; `dispose()` when done."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.url = safe_url(engine.url)
        self.is_sqlite = engine.dialect.name == "sqlite"
        self._write_sessions: sessionmaker[Session] | None = None
        self._read_sessions: sessionmaker[Session] | None = None

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A read-write unit of work: commit at the end of the block, roll back if it raises."""
        if self._write_sessions is None:
            from sqlalchemy.orm import sessionmaker

            writer = self.engine
            if self.is_sqlite:
                writer = writer.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
            self._write_sessions = sessionmaker(writer, expire_on_commit=False)
        with self._write_sessions.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session; whatever it changed is rolled back. On SQLite it does not take the write lock."""
        if self._read_sessions is None:
            from sqlalchemy.orm import sessionmaker

            self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        with self._read_sessions() as session:  # closing the session rolls back
            yield session

    @contextmanager
    def read_rows(self) -> Iterator[Connection]:
        """A read-only connection for Core queries over `tables` (the job views), without the ORM; rolled back
        at the end. On SQLite it does not take the write lock."""
        with self.engine.connect() as conn:
            yield conn

    def check(self) -> None:
        """Connect once; raises StoreUnavailable when the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def open_store(config: StoreConfig | None = None) -> Store:
    """Create the engine for `config.url` (see `resolve_database_url`) and check that the database answers."""
    config = config or StoreConfig()
    url = resolve_database_url(config.url)
    store = Store(_create_engine(url, config))
    try:
        store.check()
    except BaseException:
        store.dispose()
        raise
    return store


def _create_engine(url: URL, config: StoreConfig) -> Engine:
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        _make_sqlite_folder(url)
        connect_args["timeout"] = config.busy_timeout_s
    elif "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = config.connect_timeout_s
    engine = create_engine(
        url,
        echo=config.echo,
        connect_args=connect_args,
        pool_pre_ping=url.get_backend_name() == "postgresql",  # a long-lived controller outlives connections
    )
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, busy_timeout_ms=int(config.busy_timeout_s * 1000))
    _report_unreachable(engine)
    return engine


def _make_sqlite_folder(url: URL) -> None:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return
    try:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreUnavailable(safe_url(url), f"cannot create its folder: {err}") from err


def _configure_sqlite(engine: Engine, *, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None  # type: ignore[attr-defined]  # we emit BEGIN ourselves, below
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _report_unreachable(engine: Engine) -> None:
    url = safe_url(engine.url)

    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> BaseException | None:
        # `connection` is None when the error happened while connecting; a disconnect mid-use is the same
        # problem for the user. Pre-ping failures are retried by the pool and are not reported.
        if context.is_pre_ping or not isinstance(context.sqlalchemy_exception, DBAPIError):
            return None
        if context.connection is None or context.is_disconnect:
            cause = str(context.original_exception).strip().splitlines()
            return StoreUnavailable(url, cause[0] if cause else type(context.original_exception).__name__)
        return None
