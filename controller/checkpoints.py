"""The job's checkpoints as the controller sees them: what the trainer committed, and which one to resume.

The trainer writes step folders with a manifest and commits them atomically (trainer.contract.checkpoint);
the controller never writes there. It mirrors what it finds into the store (one row per committed step, with
its size and blocking save time) so `vlctl checkpoints`, status and the metrics need no file-system access,
and before every launch it picks the checkpoint the next attempt resumes from.

Decisions:

- Resume from the newest committed step whose files match the manifest *by checksum* (CRC-32 of every file),
  not only by size: a restart is rare and reading the checkpoint once costs far less than resuming from a
  silently corrupt one. A step that fails is recorded as corrupt (an event names the bad file) and never tried
  again; the next older one is checked. The chosen step is passed to the trainer explicitly
  (`checkpoint.resume_step`), so the trainer loads exactly what the controller verified and recorded.
- A step found corrupt is skipped from then on, unless the trainer saves it anew (its manifest is newer than
  the record): then it is a different checkpoint and is verified again.
- A person's `vlctl resume --from-step N` names the step; it must be committed and verify, or the launch
  fails with the reason rather than silently resuming from something else.
- Rows of steps the trainer pruned (`keep_last`) are removed, so the store lists what can be resumed.
- Scans are cheap listings (one `ls` of the root, one manifest read per new step); the store keeps the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from controller.store.models import Job
from controller.store.records import (
    list_checkpoints as stored_checkpoints,
)
from controller.store.records import (
    record_checkpoint,
    record_checkpoint_verification,
    refresh_last_checkpoint,
)
from trainer.contract.checkpoint import MANIFEST, join, list_checkpoints, open_root, read_manifest, verify
from trainer.contract.training import TrainingConfig

log = logging.getLogger(__name__)


class NoSuchCheckpoint(ValueError):
    """The requested step is not a committed, valid checkpoint."""


@dataclass(frozen=True, slots=True)
class ResumePoint:
    step: int
    uri: str


def checkpoint_root(training: TrainingConfig, run_dir: Path) -> str:
    """Where the trainer writes step folders: `checkpoint.dir`, relative to the run folder unless a URL/absolute."""
    d = training.checkpoint.dir
    if "://" in d or Path(d).is_absolute():
        return d
    return str(run_dir / d)


def sync_checkpoints(
    *,
    session: Session,
    job: Job,
    root: str,
    attempt: int | None,
    save_seconds: dict[int, float] | None = None,
) -> list[int]:
    """Record every committed step under `root` that the store does not know yet; returns the new steps."""
    known = {c.step: c for c in stored_checkpoints(session=session, job_id=job.id)}
    on_disk = list_checkpoints(root)
    present = {info.step for info in on_disk}
    for step, row in known.items():
        # Pruned by the trainer's keep_last: the row goes (its commit stays on the timeline as an event).
        if row.committed and step not in present:
            session.delete(row)
    new = []
    for info in on_disk:
        row = known.get(info.step)
        stall = (save_seconds or {}).get(info.step)
        if row is not None and row.committed and not _saved_again(info.uri, row):
            if stall is not None and row.save_seconds is None:
                row.save_seconds = stall
            continue
        try:
            size = sum(f["size"] for f in read_manifest(info.uri)["files"])
        except ValueError:
            size = None  # unreadable manifest: verification will say so before anyone resumes from it
        record_checkpoint(
            session=session,
            job=job,
            step=info.step,
            uri=info.uri,
            committed=True,
            attempt=attempt,
            size_bytes=size,
            save_seconds=stall,
        )
        new.append(info.step)
    session.flush()
    refresh_last_checkpoint(session=session, job=job)
    return new


def _saved_again(step_uri: str, row) -> bool:
    """A step found corrupt that the trainer has since saved anew (after resuming from an older one): its
    manifest is newer than our record, so it is a different checkpoint and gets verified again."""
    if row.verified is not False or row.committed_at is None:
        return False
    fs, root = open_root(step_uri)
    try:
        info = fs.info(join(root, MANIFEST))
    except (OSError, ValueError):
        return False
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created")
    if mtime is None:
        return False
    stamp = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
    return stamp > row.committed_at.timestamp() + 1.0


def choose_resume_point(
    *, session: Session, job: Job, root: str, from_step: int | None = None
) -> ResumePoint | None:
    """The checkpoint the next attempt resumes from (None: start from scratch); see the module docstring."""
    next_attempt = job.current_attempt + 1  # verification events belong to the attempt they choose for
    sync_checkpoints(session=session, job=job, root=root, attempt=None)
    rows = stored_checkpoints(session=session, job_id=job.id)
    if from_step is not None:
        row = next((c for c in rows if c.step == from_step and c.committed), None)
        if row is None:
            steps = ", ".join(str(c.step) for c in rows if c.committed and c.verified is not False) or "none"
            raise NoSuchCheckpoint(
                f"from_step: no committed checkpoint at step {from_step} (committed: {steps})"
            )
        result = verify(row.uri, mode="checksum")
        # A corrupt requested step fails the launch: no attempt follows for the event to belong to.
        record_checkpoint_verification(
            session=session,
            job=job,
            step=row.step,
            ok=result.ok,
            detail=result.problem,
            attempt=next_attempt if result.ok else None,
        )
        if not result.ok:
            raise NoSuchCheckpoint(
                f"from_step: the checkpoint at step {from_step} is corrupt: {result.problem}"
            )
        return ResumePoint(row.step, row.uri)
    for row in sorted(rows, key=lambda c: c.step, reverse=True):
        if not row.committed or row.verified is False:
            continue
        result = verify(row.uri, mode="checksum")
        record_checkpoint_verification(
            session=session, job=job, step=row.step, ok=result.ok, detail=result.problem, attempt=next_attempt
        )
        if result.ok:
            return ResumePoint(row.step, row.uri)
        log.warning(
            "job %s: checkpoint at step %d is corrupt, trying an older one: %s",
            job.name,
            row.step,
            result.problem,
        )
    return None
