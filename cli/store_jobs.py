"""The job commands against the controller's store (SQLite in the user's data folder by default,
VLCTL_DATABASE_URL otherwise): the store's `JobsClient` (cli/client.py), and reading a spec as `submit` and
`run` store it.

A spec is validated completely before anything is written: its fields, then (local backend) its local inputs, with relative paths taken from the current
directory and stored absolute, and the memory its ranks need (`load_submitted_spec`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.domain.phases import Phase
from controller.views import JobView, event_dict, read_job_view, read_job_views

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from controller.spec import TrainingJobSpec
    from controller.store.models import Job

from .client import Answer, LogRequest
from .errors import EXIT_USER_ERROR, CliError
from .options import confirm
from .output import stderr
from .store import load_job, store


def in_place_state(record: Mapping[str, Any]) -> dict[str, Any]:
    """In-place recovery's live state for `vlctl status`, asked of the attempt's recovery coordinator: the round,
    the newest snapshot step every rank committed, and each hot spare, waiting or still starting."""
    from controller.inplace import CoordinatorClient, CoordinatorError, starting_spares

    try:
        status = CoordinatorClient(str(record["coordinator_url"]), timeout_s=2.0).status()
    except CoordinatorError as err:
        return {"error": f"the recovery coordinator did not answer ({err})"}
    names = [n["name"] for n in record.get("spares", [])]
    starting = set(
        starting_spares(
            live_spares=names,
            waiting=status.get("spares_waiting") or [],
            procs_per_node=int(record.get("procs_per_node", 1)),
        )
    )
    spares = [{"name": n, "state": "starting" if n in starting else "waiting"} for n in names]
    return {"round": status.get("round"), "committed_step": status.get("committed_step"), "spares": spares}


def load_submitted_spec(file: Path) -> TrainingJobSpec:
    """The spec in `file` as `submit` and `run` store it: validated, its relative local paths made absolute
    against the current directory (where the user typed the command), its inputs found and its ranks' memory
    checked (controller.spec.prepare_submission); any problem is one line naming the field, exit 2."""
    from controller.spec import SpecError, load_spec, prepare_submission  # pydantic and numpy: not for `list`

    try:
        return prepare_submission(
            load_spec(file),
            base_dir=Path.cwd(),
            source=str(file),
            notice=lambda line: stderr.print(line, highlight=False, markup=False),
        )
    except SpecError as err:
        raise CliError(str(err), EXIT_USER_ERROR) from None


def create(spec: TrainingJobSpec, session: Session) -> Job:
    """Queue the job (pending); a name taken is the one-line error, exit 2."""
    from controller.store.repo import JobExists, create_job

    try:
        return create_job(session=session, name=spec.name, spec=spec.model_dump(mode="json"))
    except JobExists as err:
        raise CliError(str(err), EXIT_USER_ERROR) from None


class StoreJobs:
    """The job commands over the controller's store."""

    def submit(self, file: Path) -> Answer:
        spec = load_submitted_spec(file)
        with store() as db, db.transaction() as session:
            job = create(spec, session)
            session.flush()
            view = read_job_view(session, job)
        return Answer(view.as_dict(ranks=False), f"submitted {view.name} ({view.phase})")

    def list_jobs(self) -> list[JobView]:
        with store() as db, db.read_rows() as rows:  # Core rows: `list` never imports the ORM
            return read_job_views(rows, ranks=False)

    def status(self, name: str) -> JobView:
        from controller.store.repo import get_current_attempt

        with store() as db, db.read() as session:
            job = load_job(session, name)
            view = read_job_view(session, job)
            attempt = get_current_attempt(session=session, job=job)
            record = None if attempt is None or attempt.ended_at is not None else attempt.backend_record
        if record and record.get("coordinator_url"):
            view = dataclasses.replace(view, in_place=in_place_state(record))
        return view

    def events(self, name: str) -> list[dict[str, Any]]:
        from controller.store.repo import list_events

        with store() as db, db.read() as session:
            found = load_job(session, name)
            return [event_dict(e) for e in list_events(session=session, job_id=found.id)]

    def cancel(self, name: str, yes: bool) -> Answer:
        from controller import states

        confirm("cancel", f"cancel job {name}?", yes)
        with store() as db, db.transaction() as session:
            found = load_job(session, name)
            # Cancelling twice is not an error (the outcome the user asked for holds); an ended job cannot be.
            already = found.phase is Phase.CANCELLED
            if found.phase in (Phase.SUCCEEDED, Phase.FAILED):
                raise CliError(
                    f"cancel: job {name!r} already ended ({found.phase}); there is nothing to cancel",
                    EXIT_USER_ERROR,
                )
            if not already:
                states.cancel(found, session=session, message="cancelled from the CLI")
            session.flush()
            view = read_job_view(session, found)
        stderr.print(f"{name} is already cancelled" if already else f"cancelled {name}", highlight=False)
        return Answer(view.as_dict(ranks=False), f"{view.name}: {view.phase}")

    def logs(self, name: str, request: LogRequest) -> None:
        from .local_logs import logs

        logs(name, request)
