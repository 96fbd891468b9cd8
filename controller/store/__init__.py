"""The control plane's store: job history in SQL (SQLite by default, PostgreSQL for several controllers).

- session: the database URL, `open_store`, `Store.transaction()` (the unit of work), `StoreUnavailable`.
- tables: the schema in SQLAlchemy Core (what each column means); models: the ORM classes mapped onto it.
- migrate: Alembic migrations run from code (`upgrade(store)`).
- repo: jobs, attempts, the event timeline.   claims: which controller manages which job (leases).
- records: checkpoints, per-rank step windows, node health, goodput.

A job's phase changes only through `controller.states`.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .claims import ClaimNotHeld, claim_jobs, claim_pending_jobs, release_claims, renew_leases
    from .models import Attempt, Base, Checkpoint, Event, Job, NodeHealth, RankStepWindow
    from .repo import JobExists, JobNotFound, create_job, get_job, list_events, list_jobs_with_latest_attempt
    from .session import (
        DATABASE_URL_ENV,
        Store,
        StoreConfig,
        StoreUnavailable,
        open_store,
        resolve_database_url,
    )

# Each name is imported from its module when first used, so that code that only reads rows through `session` and
# `tables` (`vlctl list`) does not import the ORM that `models`, `claims` and `repo` are built on.
_HOME = {
    **dict.fromkeys(
        ("ClaimNotHeld", "claim_jobs", "claim_pending_jobs", "release_claims", "renew_leases"), "claims"
    ),
    **dict.fromkeys(
        ("Attempt", "Base", "Checkpoint", "Event", "Job", "NodeHealth", "RankStepWindow"), "models"
    ),
    **dict.fromkeys(
        ("JobExists", "JobNotFound", "create_job", "get_job", "list_events", "list_jobs_with_latest_attempt"),
        "repo",
    ),
    **dict.fromkeys(
        (
            "DATABASE_URL_ENV",
            "Store",
            "StoreConfig",
            "StoreUnavailable",
            "open_store",
            "resolve_database_url",
        ),
        "session",
    ),
}


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DATABASE_URL_ENV",
    "Attempt",
    "Base",
    "Checkpoint",
    "ClaimNotHeld",
    "Event",
    "Job",
    "JobExists",
    "JobNotFound",
    "NodeHealth",
    "RankStepWindow",
    "Store",
    "StoreConfig",
    "StoreUnavailable",
    "claim_jobs",
    "claim_pending_jobs",
    "create_job",
    "get_job",
    "list_events",
    "list_jobs_with_latest_attempt",
    "open_store",
    "release_claims",
    "renew_leases",
    "resolve_database_url",
]
