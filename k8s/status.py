"""A TrainingJob's status: computed from the job's view (controller/views.py, read from the controller's store),
written to the status subresource; `view_from_object` reads a status back into a view for the CLI.

Decisions:

- Conditions are keyed by type, each with a CamelCase reason, message and lastTransitionTime (kept while the
  condition's status does not change). Created is always there; the others appear once they have been True
  and then stay, False.
- `observedGeneration` is the generation admitted: spec changes after admission are not applied.
- Status is written with `replace` on the status subresource, carrying the resourceVersion read: a 409 means
  someone wrote in between, so the object is read again and the status recomputed (three tries, then the next
  pass). It is written only when it changed; progress and ETTR alone change every step, so changes of those
  alone are written at most every `status_interval_seconds`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller.domain.phases import Phase
from controller.store.models import Job
from controller.store.session import Store
from controller.views import CheckpointView, ClusterObject, JobView, RankView, read_job_view
from k8s.api import call_json, parse_time
from k8s.crd import (
    CONDITION_CREATED,
    CONDITION_FAILED,
    CONDITION_RESTARTING,
    CONDITION_RUNNING,
    CONDITION_STRAGGLER_DETECTED,
    CONDITION_SUCCEEDED,
    GROUP,
    PLURAL,
    VERSION,
    status_phase,
)
from k8s.watch import TrainingJobCache, object_key

log = logging.getLogger(__name__)

REASON_ADMITTED = "Admitted"
REASON_NO_STRAGGLERS = "NoStragglers"
REASON_STRAGGLERS = "StragglerFlagged"
STATUS_WRITE_TRIES = 3  # 409s in a row before a status waits for the next pass


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso(d: datetime | None) -> str | None:
    return None if d is None else d.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(
    type_: str, status: bool, reason: str, message: str, previous: Mapping[str, Mapping[str, Any]], now: str
) -> dict[str, Any]:
    value = "True" if status else "False"
    before = previous.get(type_)
    since = before.get("lastTransitionTime") if before and before.get("status") == value else None
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": since or now,
    }


def job_conditions(view: JobView, *, previous: Sequence[Mapping[str, Any]], now: str) -> list[dict[str, Any]]:
    """One condition per type: Created always; the others once they have been True (then kept, False)."""
    before = {c.get("type", ""): c for c in previous}
    phase, reason, message = view.phase, view.reason or "", view.message or ""
    flagged = view.stragglers
    straggling = ", ".join(f"rank {r.rank} on {r.node}" for r in flagged)
    wanted = [
        (CONDITION_CREATED, True, REASON_ADMITTED, f"admitted as job {view.name}"),
        (CONDITION_RUNNING, phase is Phase.RUNNING, reason, message),
        (CONDITION_RESTARTING, phase is Phase.RESTARTING, reason, message),
        (
            CONDITION_STRAGGLER_DETECTED,
            bool(flagged),
            REASON_STRAGGLERS if flagged else REASON_NO_STRAGGLERS,
            f"stragglers: {straggling}" if flagged else "no rank is flagged",
        ),
        (CONDITION_SUCCEEDED, phase is Phase.SUCCEEDED, reason, message),
        (CONDITION_FAILED, phase is Phase.FAILED, reason, message),
    ]
    return [
        _condition(type_, status, why, text, before, now)
        for type_, status, why, text in wanted
        if status or type_ == CONDITION_CREATED or type_ in before
    ]


def job_status(
    view: JobView, *, generation: int, previous: Mapping[str, Any] | None, now: str
) -> dict[str, Any]:
    """The TrainingJob's status from the job's view: what `kubectl get tj` and the printer columns show.
    `view_from_object` reads it back."""
    assert view.phase is not None  # a store job always has one
    status: dict[str, Any] = {
        "phase": status_phase(view.phase),
        "conditions": job_conditions(view, previous=(previous or {}).get("conditions") or [], now=now),
        "attempt": view.attempt,
        "restarts": view.restarts,
        "restartsCounted": view.restarts_counted,
        "stragglers": [
            {
                "rank": r.rank,
                "node": r.node,
                **({"score": r.straggler_score} if r.straggler_score is not None else {}),
            }
            for r in view.stragglers
        ],
        "excludedNodes": list(view.excluded_nodes),
        "observedGeneration": generation,
    }
    if (ckpt := view.last_checkpoint) is not None:
        checkpoint: dict[str, Any] = {"step": ckpt.step, "uri": ckpt.uri or ""}
        if when := iso(ckpt.committed_at):
            checkpoint["time"] = when
        status["lastCheckpoint"] = checkpoint
    if view.ettr is not None:
        status["ettr"] = round(min(1.0, max(0.0, view.ettr)), 4)
    progress: dict[str, Any] = {}
    if view.step is not None:
        progress["step"] = view.step
    if view.total_steps is not None:
        progress["totalSteps"] = view.total_steps
    if view.loss is not None:
        progress["loss"] = view.loss
    if view.tokens_per_second is not None:
        progress["tokensPerSecond"] = max(0.0, view.tokens_per_second)
    if progress:
        status["progress"] = progress
    return status


# Which condition's reason and message explain the phase, most telling first.
_PHASE_CONDITIONS = (
    CONDITION_FAILED,
    CONDITION_SUCCEEDED,
    CONDITION_RESTARTING,
    CONDITION_RUNNING,
    CONDITION_CREATED,
)


def view_from_object(obj: Mapping[str, Any]) -> JobView:
    """A TrainingJob read back as the job's view (`vlctl --backend kubernetes list|status`): what `job_status`
    wrote, plus the object's own metadata. No status: the operator has not admitted it yet (phase None)."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    resources = (obj.get("spec") or {}).get("resources") or {}
    progress = status.get("progress") or {}
    held = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    explaining = next((held[t] for t in _PHASE_CONDITIONS if t in held), {})
    phase = status.get("phase")
    checkpoint = status.get("lastCheckpoint") or {}
    return JobView(
        name=meta.get("name", ""),
        phase=Phase(phase.lower()) if isinstance(phase, str) and phase.lower() in set(Phase) else None,
        reason=explaining.get("reason"),
        message=explaining.get("message") or None,
        backend="kubernetes",
        attempt=status.get("attempt", 0),
        restarts=status.get("restarts", 0),
        restarts_counted=status.get("restartsCounted", 0),
        max_restarts=((obj.get("spec") or {}).get("fault_tolerance") or {}).get("max_restarts"),
        nodes=resources.get("nodes", 1),
        procs_per_node=resources.get("procs_per_node", 1),
        step=progress.get("step"),
        total_steps=progress.get("totalSteps"),
        loss=progress.get("loss"),
        tokens_per_second=progress.get("tokensPerSecond"),
        last_checkpoint=None
        if not checkpoint
        else CheckpointView(
            step=checkpoint.get("step"),
            uri=checkpoint.get("uri"),
            committed_at=parse_time(checkpoint.get("time")),
        ),
        ettr=status.get("ettr"),
        excluded_nodes=tuple(status.get("excludedNodes") or ()),
        created=parse_time(meta.get("creationTimestamp")),
        stragglers=tuple(
            RankView(
                rank=s.get("rank"), node=s.get("node", "?"), straggler_score=s.get("score"), flagged=True
            )
            for s in status.get("stragglers") or ()
        ),
        cluster=ClusterObject(
            namespace=meta.get("namespace"),
            uid=meta.get("uid"),
            deleted=meta.get("deletionTimestamp"),
            generation=meta.get("generation"),
            observed_generation=status.get("observedGeneration"),
            finalizers=tuple(meta.get("finalizers") or ()),
            conditions=tuple(status.get("conditions") or ()),
        ),
    )


def rejected_status(
    reason: str, message: str, *, generation: int, previous: Mapping[str, Any] | None
) -> dict:
    before = {c.get("type", ""): c for c in (previous or {}).get("conditions") or []}
    return {
        "phase": status_phase(Phase.FAILED),
        "conditions": [_condition(CONDITION_FAILED, True, reason, message, before, utc_now())],
        "observedGeneration": generation,
    }


def _without_progress(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k not in ("progress", "ettr")}


class StatusWriter:
    """Writes TrainingJob statuses through the (leader-guarded) API; remembers when it last wrote each one."""

    def __init__(
        self,
        store: Store,
        custom: client.CustomObjectsApi,
        cache: TrainingJobCache,
        *,
        interval_seconds: float,
    ) -> None:
        self.store = store
        self.custom = custom
        self.cache = cache
        self.interval_seconds = interval_seconds
        self._written: dict[
            tuple[str, str], float
        ] = {}  # (namespace, name) -> monotonic time of the last write

    def write_job_status(self, obj: Mapping[str, Any], *, job_id: int, generation: int) -> None:
        """The status of the store job bound to `obj`, admitted at `generation`."""

        def compute(fresh: Mapping[str, Any]) -> dict[str, Any]:
            with self.store.read() as session:
                job = session.get(Job, job_id)
                assert job is not None
                view = read_job_view(session, job)
            return job_status(view, generation=generation, previous=fresh.get("status"), now=utc_now())

        self.write(obj, compute)

    def write_rejected(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        """The Failed condition with the one-line reason of a TrainingJob that is not admitted."""
        generation = int(obj["metadata"].get("generation") or 1)
        self.write(
            obj,
            lambda fresh: rejected_status(
                reason, message, generation=generation, previous=fresh.get("status")
            ),
        )

    def write(self, obj: Mapping[str, Any], compute: Callable[[Mapping[str, Any]], dict]) -> None:
        """Replace the status when it changed; on 409 read the object again and recompute (three tries).
        Changes of progress and ETTR alone are written at most every `status_interval_seconds`."""
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        fresh: Mapping[str, Any] = obj
        for _ in range(STATUS_WRITE_TRIES):
            status = compute(fresh)
            before = fresh.get("status") or {}
            if before == status:
                return
            recent = time.monotonic() - self._written.get(key, -1e9) < self.interval_seconds
            if recent and _without_progress(before) == _without_progress(status):
                return
            body = {**fresh, "status": status}
            try:
                answer = call_json(
                    self.custom.replace_namespaced_custom_object_status, GROUP, VERSION, meta["namespace"],
                    PLURAL, meta["name"], body,
                )  # fmt: skip
                self.cache.put(answer)
                self._written[key] = time.monotonic()
                return
            except ApiException as err:
                if err.status == 404:
                    return
                if err.status != 409:
                    raise
            fresh = call_json(
                self.custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
            )
        log.warning(
            "TrainingJob %s: status not written after %d conflicts; next pass",
            object_key(obj),
            STATUS_WRITE_TRIES,
        )
