"""The job's timeline as core/v1 Events on its TrainingJob (`kubectl describe tj`).

Decisions:

- Each store event becomes one Kubernetes Event named after the event's number (and the object's uid), so a
  replica that sends one again gets AlreadyExists (409) instead of a duplicate.
- A replica new to a job (just elected, or the job just admitted) re-sends the job's last
  `MIRRORED_EVENTS_ON_START` events rather than its whole history; after that, only newer ones.
- Failures, stragglers and node-health events are Warnings; the rest Normal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from sqlalchemy import select

from controller.domain.phases import EventType
from controller.store.models import Event
from controller.store.session import Store
from k8s.api import call_json
from k8s.config import COMPONENT
from k8s.crd import API_VERSION, KIND
from k8s.status import iso, utc_now

# A replica new to a job re-sends its last events (duplicates are refused by name).
MIRRORED_EVENTS_ON_START = 20
WARNING_EVENT_TYPES = frozenset({EventType.FAILURE, EventType.STRAGGLER, EventType.NODE_HEALTH})


class EventMirror:
    """Sends each job's new store events once; remembers per job the newest event number sent."""

    def __init__(self, store: Store, core: client.CoreV1Api, *, identity: str) -> None:
        self.store = store
        self.core = core
        self.identity = identity  # the Events' reportingInstance
        self._mirrored: dict[int, int] = {}  # store job id -> newest event seq sent as a Kubernetes Event

    def reset(self) -> None:
        """Forget what was sent (on becoming the leader: another replica may have sent more meanwhile)."""
        self._mirrored.clear()

    def forget(self, job_id: int) -> None:
        self._mirrored.pop(job_id, None)

    def mirror(self, obj: Mapping[str, Any], job_id: int) -> None:
        """The job's new store events as core/v1 Events on the TrainingJob (`kubectl describe tj`). Names are
        derived from the event's number, so a replica that sends one again gets 409 and moves on."""
        meta = obj["metadata"]
        with self.store.read() as session:
            after = self._mirrored.get(job_id)
            stmt = select(Event).where(Event.job_id == job_id).order_by(Event.seq.desc())
            if after is None:
                events = list(session.scalars(stmt.limit(MIRRORED_EVENTS_ON_START)))
            else:
                events = list(session.scalars(stmt.where(Event.seq > after)))
        for e in reversed(events):
            when = iso(e.time) or utc_now()
            body = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"{meta['name']}.{meta['uid'][:8]}.{e.seq}",
                    "namespace": meta["namespace"],
                },
                "involvedObject": {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta["uid"],
                },
                "reason": e.reason,
                "message": (e.message or e.reason)[:1024],
                "type": "Warning" if e.type in WARNING_EVENT_TYPES else "Normal",
                "firstTimestamp": when,
                "lastTimestamp": when,
                "count": 1,
                "source": {"component": COMPONENT},
                "reportingComponent": COMPONENT,
                "reportingInstance": self.identity,
            }
            try:
                call_json(self.core.create_namespaced_event, meta["namespace"], body)
            except ApiException as err:
                if err.status != 409:
                    raise
            self._mirrored[job_id] = e.seq
        self._mirrored.setdefault(job_id, 0)
