"""Storage outages: a save that fails because the checkpoint storage cannot be written, and what the training
loop does about it (keep training, retry with backoff, give up after `storage_outage_seconds`).

Decisions:

* A storage failure is an OSError, anywhere in the error's chain (DCP wraps each rank's write error in a
  CheckpointException, a BaseException), whose errno says the storage refused or lost the write: EACCES, EPERM
  (`chattr +i`, a lost lease), EROFS, ENOSPC, EDQUOT, EIO, ESTALE, ENOTCONN, ETIMEDOUT and the connection
  errors; or, without an errno (fsspec object stores translate HTTP 403 and network failures so),
  PermissionError, ConnectionError and TimeoutError. Anything else (a rank that died, a bug, ENOENT) stays a
  plain CheckpointError and ends the run as before.
* The classification is made where the error happens, and rank 0 folds every rank's verdict into the commit
  decision it broadcasts: a save is a storage failure on every rank or on none, so the ranks always take the
  same branch (see Checkpointer.settle).
* Nothing partial is ever committed: a failed save never writes its manifest nor renames its folder; the next
  successful save's retention deletes the leftovers.
* Backoff after the n-th consecutive failure: min(RETRY_MAX_S, RETRY_BASE_S x 2^(n-1)) seconds (1, 2, 4, ... 60),
  measured from the failure. A retry saves the newest state at the first step boundary after that, in place of
  the regular interval (an interval save due earlier is skipped: it would fail the same way, and each attempt
  costs a staging copy). Once `limit_s` have passed since the first failure of the outage, the run gives up;
  the give-up check runs at every step boundary, so it comes within a step of the limit.
* Clocks are per rank (time.monotonic). The ranks act on them only through an all-reduce (the step's sync point:
  any rank that sees a retry or the limit due makes every rank act), so they never diverge in whether they
  call save.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from trainer.checkpoint.load import CheckpointError

log = logging.getLogger(__name__)

STORAGE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EACCES",
        "EPERM",
        "EROFS",
        "ENOSPC",
        "EDQUOT",
        "EIO",
        "ESTALE",
        "ENOTCONN",
        "ETIMEDOUT",
        "ECONNREFUSED",
        "ECONNRESET",
        "EHOSTUNREACH",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)
RETRY_BASE_S = 1.0
RETRY_MAX_S = 60.0


def storage_failure(exc: BaseException | None) -> BaseException | None:
    """The OSError in `exc`'s chain (causes, contexts, DCP's per-rank failures) that says the storage is
    unavailable; None when there is none."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            if e.errno in STORAGE_ERRNOS:
                return e
            if e.errno is None and isinstance(e, PermissionError | ConnectionError | TimeoutError):
                return e
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return None


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class CheckpointStorageError(CheckpointError):
    """A save failed because the checkpoint storage could not be written; the same on every rank."""

    def __init__(self, message: str, *, step: int, uri: str, error: str) -> None:
        super().__init__(message)
        self.step = step
        self.uri = uri  # the checkpoint root
        self.error = error  # the first storage error, "Type: message" (it names the file or folder)


@dataclass(slots=True)
class StorageOutage:
    """The state of one outage, on one rank: updated only from save outcomes, which are the same on every rank."""

    limit_s: float
    since: float | None = None  # time.monotonic() of the outage's first failed save; None: no outage
    failures: int = 0
    next_retry_at: float = 0.0
    last: CheckpointStorageError | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def seconds(self, now: float) -> float:
        return 0.0 if self.since is None else max(0.0, now - self.since)

    def retry_due(self, now: float) -> bool:
        return self.since is not None and now >= self.next_retry_at

    def expired(self, now: float) -> bool:
        return self.since is not None and now - self.since >= self.limit_s

    def failed(self, error: CheckpointStorageError, now: float) -> None:
        if self.since is None:
            self.since = now
        self.failures += 1
        self.last = error
        delay = min(RETRY_MAX_S, RETRY_BASE_S * 2.0 ** min(self.failures - 1, 64))
        self.next_retry_at = now + delay
        log.warning(
            "checkpoint step %d not saved, %s at %s: %s; training goes on, retry %d in %.0f s "
            "(gives up %.0f s after the first failure, %.0f s from now)",
            error.step,
            "storage unavailable",
            error.uri,
            error.error,
            self.failures,
            delay,
            self.limit_s,
            max(0.0, self.since + self.limit_s - now),
        )

    def committed(self, step: int, now: float) -> None:
        if self.since is not None:
            log.info(
                "checkpoint storage is back after %.0f s and %d failed save(s): step %d committed",
                now - self.since,
                self.failures,
                step,
            )
        self.since, self.failures, self.last = None, 0, None
