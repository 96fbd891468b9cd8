"""Leader election among the operator's replicas, and the write guard that makes only the leader act.

Decisions:

- A coordination.k8s.io Lease, as client-go does it: a candidate takes the Lease when its holder has not renewed
  it for the lease duration, measured on the candidate's own clock from when it last saw the record change (no
  clock comparison across machines); the leader stops acting once it has not renewed for the renew deadline
  (shorter than the duration, so it stops before anyone can take over).
- The Lease is renewed in its own thread, and every write the operator and the backend make goes through an API
  client that refuses writes while this replica is not the leader (`NotLeader`, a BaseException so that no
  `except Exception` in the controller core swallows it): losing the lease stops all acting at the next
  request, even in the middle of a pass. The controller's claims in the store are a second fence.
- Leaving as the leader hands the Lease over at once (holder emptied), so the standby need not wait it out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from k8s.api import api_error, call_json
from k8s.config import LEASE_NAME

log = logging.getLogger(__name__)


class NotLeader(BaseException):
    """A write while this replica does not hold the Lease. A BaseException: it must cross the controller core's
    per-job `except Exception` handlers, so a replica that lost the lease stops acting at once."""


class LeaderGuardedApiClient(client.ApiClient):
    """Refuses every write (POST, PUT, PATCH, DELETE) unless `may_write()`; reads always pass."""

    def __init__(self, configuration: client.Configuration, may_write: Callable[[], bool]):
        super().__init__(configuration)
        self.may_write = may_write

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if method in ("POST", "PUT", "PATCH", "DELETE") and not self.may_write():
            raise NotLeader(f"{method} {url}: this replica is not the leader")
        return super().request(method, url, *args, **kwargs)


def _micro_time(d: datetime) -> str:
    return d.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Holds a coordination.k8s.io/v1 Lease while it can; `is_leader()` is what every write checks."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        namespace: str,
        identity: str,
        name: str = LEASE_NAME,
        lease_seconds: float = 15.0,
        renew_deadline_seconds: float = 10.0,
        retry_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 0 < retry_seconds < renew_deadline_seconds < lease_seconds:
            raise ValueError(
                "leader election: need 0 < retry_seconds < renew_deadline_seconds < lease_seconds, got "
                f"{retry_seconds}, {renew_deadline_seconds}, {lease_seconds}"
            )
        if not identity:
            raise ValueError("identity: the leader-election identity must not be empty")
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds = lease_seconds
        self.renew_deadline_seconds = renew_deadline_seconds
        self.retry_seconds = retry_seconds
        self.clock = clock
        self._renewed_at: float | None = None  # our clock, at our last successful acquire or renew
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime, transitions) last seen
        self._observed_at = 0.0
        self._lock = threading.Lock()

    def is_leader(self) -> bool:
        with self._lock:
            renewed = self._renewed_at
        return renewed is not None and self.clock() - renewed < self.renew_deadline_seconds

    def _set_leader(self, renewed_at: float | None, *, quiet: bool = False) -> None:
        with self._lock:
            was = self._renewed_at is not None
            self._renewed_at = renewed_at
        if renewed_at is None and was and not quiet:
            log.warning("%s lost the lease %s/%s", self.identity, self.namespace, self.name)

    def try_acquire_or_renew(self) -> bool:
        now, t = datetime.now(UTC), self.clock()
        try:
            lease = call_json(self.api.read_namespaced_lease, self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            return self._create(now, t)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, t
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        if holder and holder != self.identity and t - self._observed_at < duration:
            self._set_leader(None)
            return False
        taking_over = holder != self.identity
        lease["spec"] = {
            **spec,
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(round(self.lease_seconds)),
            "renewTime": _micro_time(now),
            "acquireTime": _micro_time(now) if taking_over else spec.get("acquireTime", _micro_time(now)),
            "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (1 if taking_over and holder else 0),
        }
        try:
            lease = call_json(self.api.replace_namespaced_lease, self.name, self.namespace, lease)
        except ApiException as err:
            if err.status == 409:  # another candidate wrote first
                self._set_leader(None)
                return False
            raise
        spec = lease["spec"]
        self._observed = (spec["holderIdentity"], spec.get("renewTime"), spec.get("leaseTransitions"))
        self._observed_at = t
        if taking_over:
            log.info("%s took the lease %s/%s", self.identity, self.namespace, self.name)
        self._set_leader(t)
        return True

    def _create(self, now: datetime, t: float) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(round(self.lease_seconds)),
                "acquireTime": _micro_time(now),
                "renewTime": _micro_time(now),
                "leaseTransitions": 0,
            },
        }
        try:
            call_json(self.api.create_namespaced_lease, self.namespace, body)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        log.info("%s created the lease %s/%s", self.identity, self.namespace, self.name)
        self._set_leader(t)
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.try_acquire_or_renew()
            except Exception as err:  # an unreachable API server: the renew deadline ends leadership
                log.warning("leader election: %s", api_error(err) if isinstance(err, ApiException) else err)
            stop.wait(self.retry_seconds)

    def release(self) -> None:
        """Hand the lease over at once (holder emptied) when leaving as the leader."""
        if not self.is_leader():
            return
        self._set_leader(None, quiet=True)
        try:
            lease = call_json(self.api.read_namespaced_lease, self.name, self.namespace)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {
                **lease["spec"],
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": _micro_time(datetime.now(UTC)),
            }
            call_json(self.api.replace_namespaced_lease, self.name, self.namespace, lease)
        except ApiException as err:
            log.warning("releasing the lease: %s", api_error(err))
