"""The controller's store, opened from the CLI: VLCTL_DATABASE_URL, else SQLite in the user's data folder.

Every command that reads or writes the store opens it here and brings its schema up to date first (a database
already at the newest schema costs one read: controller/store/migrate.py). A database that cannot be reached is
exit code 3; an unknown job name, exit code 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from controller.store import migrate
from controller.store.session import Store, StoreConfig, StoreUnavailable, open_store

from .errors import EXIT_UNAVAILABLE, EXIT_USER_ERROR, CliError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from controller.store.models import Job


@contextmanager
def store() -> Iterator[Store]:
    try:
        opened = open_store(StoreConfig())
    except StoreUnavailable as err:
        raise CliError(str(err), EXIT_UNAVAILABLE) from None
    try:
        migrate.upgrade(opened)
        yield opened
    except StoreUnavailable as err:  # the server went away mid-command (e.g. during `logs --follow`)
        raise CliError(str(err), EXIT_UNAVAILABLE) from None
    finally:
        opened.dispose()


def load_job(session: Session, name: str) -> Job:
    """The job named `name`, or the one-line "no job named ..." error (exit 2)."""
    from controller.store.repo import JobNotFound, get_job  # the ORM: not for `list` (see store/tables.py)

    try:
        return get_job(session=session, name=name)
    except JobNotFound as err:
        raise CliError(str(err).strip('"'), EXIT_USER_ERROR) from None
