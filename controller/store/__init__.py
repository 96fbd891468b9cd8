"""The control plane's store: job history in SQL (SQLite by default, PostgreSQL for several controllers).

- session: the database URL, `open_store`, `Store.transaction()` (the unit of work), `StoreUnavailable`.
- models: the tables, typed SQLAlchemy 2 mapped classes.
- migrate: Alembic migrations run from code (`upgrade(store)`).
- repo: jobs, attempts, the event timeline.   claims: which controller manages which job (leases).
- records: checkpoints, per-rank step windows, node health, goodput.

A job's phase changes only through `controller.states`.
"""

from .claims import ClaimNotHeld, claim_jobs, claim_pending_jobs, release_claims, renew_leases
from .models import Attempt, Base, Checkpoint, Event, Job, NodeHealth, RankStepWindow
from .repo import JobExists, JobNotFound, create_job, get_job, list_events, list_jobs_with_latest_attempt
from .session import DATABASE_URL_ENV, Store, StoreConfig, StoreUnavailable, open_store, resolve_database_url

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
