"""An in-process stand-in for the Kubernetes API server, speaking the REST protocol the official client uses.

What it implements, the way the real server does:

- Paths: `/api/v1/...` (core) and `/apis/<group>/<version>/...`, namespaced and cluster-wide collections, items,
  and the `status` and `log` (pods) subresources, for the resources in `RESOURCES`.
- Every object gets `uid`, `creationTimestamp`, `generation` and a `resourceVersion` from one global counter.
  A replace or patch carrying a stale `resourceVersion` gets 409 Conflict; custom resources need one to be
  replaced. Writes to an object with a status subresource keep its status; writes to `/status` change only it.
  `generation` moves when anything outside metadata and status changes.
- list with `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists, `!key`) and `fieldSelector` (`=`, `==`,
  `!=`; `metadata.name` and `metadata.namespace`, and for Events also `involvedObject.kind`, `.name`,
  `.namespace`, `.uid`, `.apiVersion`, `reason` and `type`; any other field is 400 BadRequest).
- create (409 AlreadyExists, `generateName`), get (404 NotFound), replace, patch (merge patch, JSON patch, and
  strategic merge patch treated as a merge patch: enough for the maps the operator patches; a dict sent as a
  JSON patch is rejected as the real server does), delete (DeleteOptions preconditions; finalizers: `deletionTimestamp` set, the object kept until its
  finalizers are removed; ownerReferences garbage collection: deleting an owner deletes its dependents unless
  `propagationPolicy: Orphan`).
- watch=true streams ADDED/MODIFIED/DELETED events as JSON lines (chunked), from `resourceVersion` onwards out of
  a bounded history, or every current object as ADDED first when no version is given; a version older than the
  history gets an ERROR event with a 410 Expired Status. `timeoutSeconds` ends the stream.
- Errors are `Status` objects (kind Status, reason, code, details).

What it does not: authentication, admission, defaulting, schema validation, server-side apply, and there is no
kubelet: pods keep the status tests give them (`set_pod_status`), and a deleted pod is gone at once. (A test
that needs pods to run starts `kubelet.LocalKubelet` beside it.)

Test helpers: `inject` (the next N matching requests answer an error, or wait until released), `set_pod_status`,
`set_pod_log`, `compact` (forget the watch history: the next resumed watch gets 410), `requests` (every request
with its RBAC verb, group, resource and the client's User-Agent) and `implied_permissions` (what the
OwnerReferencesPermissionEnforcement admission plugin would also check: update on the owner's finalizers for a
dependent created with blockOwnerDeletion).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES = (
    Resource("", "v1", "pods", "Pod"),
    Resource("", "v1", "services", "Service"),
    Resource("", "v1", "configmaps", "ConfigMap", status_subresource=False),
    Resource("", "v1", "secrets", "Secret", status_subresource=False),
    Resource("", "v1", "events", "Event", status_subresource=False),
    Resource("", "v1", "nodes", "Node", namespaced=False),
    Resource("coordination.k8s.io", "v1", "leases", "Lease", status_subresource=False),
    Resource("scheduling.volcano.sh", "v1beta1", "podgroups", "PodGroup"),
    Resource("vlctl.dev", "v1alpha1", "trainingjobs", "TrainingJob"),
)
_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
_BY_KIND = {(r.api_version, r.kind): r for r in RESOURCES}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SKIP_FOR_GENERATION = ("metadata", "status", "kind", "apiVersion")


class ApiError(Exception):
    """An answer other than success: becomes a Status object."""

    def __init__(self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.details = code, reason, dict(details or {})

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": str(self),
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


_REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


@dataclass
class Fault:
    """Matches requests by verb, resource (`pods`, `trainingjobs/status`) and name; None matches anything."""

    code: int | None  # the error to answer; None: hold the request until `release` is set, then serve it
    count: int
    after: bool = False  # serve the request, then answer the error (a reply lost after the write was done)
    verb: str | None = None
    resource: str | None = None
    name: str | None = None
    release: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)  # set once a request is waiting

    def matches(self, verb: str, resource: str, name: str | None) -> bool:
        return (
            self.count > 0
            and self.verb in (None, verb)
            and self.resource in (None, resource)
            and self.name in (None, name)
        )


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str
    resource: str  # plural, or plural/subresource
    namespace: str | None
    name: str | None
    code: int
    user_agent: str


@dataclass(frozen=True)
class _Event:
    rv: int
    plural: str
    namespace: str
    type: str
    obj: dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------------ selectors


def _split_terms(selector: str) -> list[str]:
    """Comma-separated terms; commas inside `in (a,b)` belong to the term."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(selector):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return [t.strip() for t in terms if t.strip()]


_SET_TERM = re.compile(r"^([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)$")


def label_matcher(selector: str | None) -> Callable[[Mapping[str, str]], bool]:
    """A label selector string -> a predicate on a label map; ApiError 400 for what the server would reject."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for term in _split_terms(selector or ""):
        if m := _SET_TERM.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if op == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif "!=" in term:
            key, value = (p.strip() for p in term.split("!=", 1))
            checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif "=" in term:
            key, value = (p.strip() for p in re.split(r"==?", term, maxsplit=1))
            checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif term.startswith("!"):
            absent = term[1:].strip()
            checks.append(lambda labels, k=absent: k not in labels)
        elif re.fullmatch(r"[\w./-]+", term):
            checks.append(lambda labels, k=term: k in labels)
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return lambda labels: all(check(labels) for check in checks)


# Field labels every resource supports, and those a resource adds (a subset of the real server's, for the
# selectors vlctl sends); the real server answers any other label with 400.
_FIELDS = ("metadata.name", "metadata.namespace")
_RESOURCE_FIELDS = {
    "events": (
        "involvedObject.kind", "involvedObject.name", "involvedObject.namespace", "involvedObject.uid",
        "involvedObject.apiVersion", "reason", "type",
    ),
}  # fmt: skip


def field_matcher(selector: str | None, plural: str = "") -> Callable[[Mapping[str, Any]], bool]:
    """A field selector string for a resource (its plural) -> a predicate on its objects; ApiError 400 for a
    field label the resource does not support. An absent field compares as the empty string."""
    supported = (*_FIELDS, *_RESOURCE_FIELDS.get(plural, ()))
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for term in _split_terms(selector or ""):
        negate = "!=" in term
        key, value = (p.strip() for p in re.split(r"!=|==?", term, maxsplit=1))
        if key not in supported:
            raise ApiError(400, "BadRequest", f'field label not supported: "{key}"')
        path = tuple(key.split("."))
        checks.append(lambda obj, p=path, v=value, n=negate: (_field(obj, p) == v) != n)
    return lambda obj: all(check(obj) for check in checks)


def _field(obj: Mapping[str, Any], path: tuple[str, ...]) -> str:
    node: Any = obj
    for part in path:
        node = node.get(part) if isinstance(node, Mapping) else None
    return "" if node is None else str(node)


# ------------------------------------------------------------------------------------------------ patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"json patch: bad path {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: Any, ops: list[Any]) -> Any:
    """RFC 6902 add, remove, replace and test."""
    doc = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(422, "Invalid", f"json patch: malformed operation {op!r}")
        *parents, last = _pointer(op["path"]) or [""]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.get(part)
            if node is None:
                raise ApiError(422, "Invalid", f"json patch: {op['path']} does not exist")
        kind = op["op"]
        if kind == "test":
            current = node[int(last)] if isinstance(node, list) else node.get(last)
            if current != op.get("value"):
                raise ApiError(422, "Invalid", f"json patch: test failed at {op['path']}")
        elif kind in ("add", "replace"):
            if isinstance(node, list):
                index = len(node) if last == "-" else int(last)
                if kind == "add":
                    node.insert(index, op["value"])
                else:
                    node[index] = op["value"]
            else:
                if kind == "replace" and last not in node:
                    raise ApiError(422, "Invalid", f"json patch: {op['path']} does not exist")
                node[last] = op["value"]
        elif kind == "remove":
            try:
                del node[int(last) if isinstance(node, list) else last]
            except (KeyError, IndexError):
                raise ApiError(422, "Invalid", f"json patch: {op['path']} does not exist") from None
        else:
            raise ApiError(422, "Invalid", f"json patch: unsupported operation {kind!r}")
    return doc


# ------------------------------------------------------------------------------------------------ the server


class FakeApiServer:
    """Start with `start()` (returns the base URL), stop with `stop()`; objects live in memory."""

    def __init__(self, *, history: int = 1000):
        self._lock = threading.Condition()
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, namespace, name)
        self._history: deque[_Event] = deque(maxlen=history)
        self._compacted_rv = 0  # events up to this version are gone from the history
        self._epoch = 0  # bumped by compact(): open watches end with 410
        self._rv = 0
        self._faults: list[Fault] = []
        self._logs: dict[tuple[str, str], str] = {}
        self._requests: list[Request] = []
        self._implied: list[tuple[str, str, str]] = []
        self._stopping = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------- lifecycle

    def start(self) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        self._server = server
        # `stop()` waits for the loop's next look at its shutdown flag: every 0.5 s by default, per test.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-apiserver", daemon=True
        )
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_port}"

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for fault in self._faults:
                fault.release.set()
            self._lock.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ---------------------------------------------------------------------------- test helpers

    def inject(
        self,
        code: int | None,
        *,
        verb: str | None = None,
        resource: str | None = None,
        name: str | None = None,
        count: int = 1,
        after: bool = False,
    ) -> Fault:
        """The next `count` requests matching answer `code` (None: wait until `fault.release` is set; `after`:
        carry the request out first, as when a reply is lost after the server did the write)."""
        fault = Fault(code=code, count=count, verb=verb, resource=resource, name=name, after=after)
        with self._lock:
            self._faults.append(fault)
        return fault

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def implied_permissions(self) -> set[tuple[str, str, str]]:
        with self._lock:
            return set(self._implied)

    def compact(self) -> None:
        """Forget the watch history, as after an API server restart with a fresh watch cache: open watches end
        with 410 Gone, and so does resuming any watch from a version before now."""
        with self._lock:
            self._history.clear()
            self._compacted_rv = self._rv
            self._epoch += 1
            self._lock.notify_all()

    def objects(
        self, plural: str, namespace: str | None = None, *, labels: str | None = None
    ) -> list[dict[str, Any]]:
        match = label_matcher(labels)
        with self._lock:
            return [
                copy.deepcopy(obj)
                for (p, ns, _), obj in sorted(self._objects.items())
                if p == plural
                and namespace in (None, ns)
                and match((obj.get("metadata") or {}).get("labels") or {})
            ]

    def get(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        with self._lock:
            obj = self._objects.get((plural, namespace or "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def put_object(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create (or overwrite) an object directly, as another client would."""
        resource = _BY_KIND[(obj["apiVersion"], obj["kind"])]
        meta = obj["metadata"]
        with self._lock:
            existing = self._objects.get((resource.plural, meta.get("namespace", ""), meta["name"]))
            if existing is None:
                return self._create(resource, meta.get("namespace", ""), copy.deepcopy(dict(obj)))
            return self._store(resource, dict(obj), "MODIFIED")

    def modify(self, plural: str, namespace: str | None, name: str, change: Callable[[dict], None]) -> dict:
        """Apply `change` to the stored object (as a controller or kubelet would), with a new version."""
        resource = next(r for r in RESOURCES if r.plural == plural)
        with self._lock:
            obj = copy.deepcopy(self._objects[(plural, namespace or "", name)])
            change(obj)
            return self._store(resource, obj, "MODIFIED")

    def set_pod_status(
        self,
        namespace: str,
        name: str,
        phase: str,
        *,
        exit_code: int | None = None,
        reason: str | None = None,
        pod_ip: str | None = None,
        node_name: str | None = None,
    ) -> dict[str, Any]:
        """What the scheduler and kubelet would write: the node, the IP, the phase, the container's state."""

        def change(pod: dict[str, Any]) -> None:
            if node_name is not None:
                pod["spec"]["nodeName"] = node_name
            status = pod.setdefault("status", {})
            status["phase"] = phase
            if pod_ip is not None:
                status["podIP"] = pod_ip
                status["podIPs"] = [{"ip": pod_ip}]
            if reason is not None:
                status["reason"] = reason
            names = [c["name"] for c in pod["spec"].get("containers", [])]
            if phase == "Running":
                state: dict[str, Any] | None = {"running": {"startedAt": _now()}}
            elif phase == "Succeeded" or (phase == "Failed" and exit_code is not None):
                code = exit_code if exit_code is not None else 0
                state = {
                    "terminated": {
                        "exitCode": code,
                        "reason": reason or ("Completed" if code == 0 else "Error"),
                        "finishedAt": _now(),
                    }
                }
            elif phase == "Failed":
                state = None  # evicted, or lost with its node: no container reported an exit
            else:
                state = {"waiting": {"reason": reason or "ContainerCreating"}}
            status["containerStatuses"] = (
                [{"name": n, "ready": phase == "Running", "restartCount": 0, "state": state} for n in names]
                if state is not None
                else []
            )

        return self.modify("pods", namespace, name, change)

    def set_pod_log(self, namespace: str, name: str, text: str) -> None:
        with self._lock:
            self._logs[(namespace, name)] = text

    # ---------------------------------------------------------------------------- storage (lock held)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(self, resource: Resource, event_type: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        if (
            len(self._history) == self._history.maxlen
        ):  # the oldest event drops out: resuming before it is 410
            self._compacted_rv = max(self._compacted_rv, self._history[0].rv)
        self._history.append(
            _Event(
                int(meta["resourceVersion"]),
                resource.plural,
                meta.get("namespace", ""),
                event_type,
                copy.deepcopy(obj),
            )
        )
        self._lock.notify_all()

    def _create(self, resource: Resource, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name or not _NAME.match(name) or len(name) > 253:
            raise ApiError(422, "Invalid", f"{resource.kind} {name!r} is invalid: metadata.name")
        if resource.namespaced:
            if meta.get("namespace") not in (None, namespace):
                raise ApiError(400, "BadRequest", "the namespace of the object does not match the request")
            meta["namespace"] = namespace
        key = (resource.plural, namespace, name)
        if key in self._objects:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{resource.plural} "{name}" already exists',
                {"name": name, "group": resource.group, "kind": resource.plural},
            )
        obj["apiVersion"], obj["kind"] = resource.api_version, resource.kind
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        meta.pop("deletionTimestamp", None)
        if resource.status_subresource:
            obj.pop("status", None)
        if resource.plural == "pods":
            obj["status"] = {"phase": "Pending"}
        for owner in meta.get("ownerReferences") or []:
            if owner.get("blockOwnerDeletion"):
                target = _BY_KIND.get((owner.get("apiVersion"), owner.get("kind")))
                if target is not None:
                    self._implied.append((target.group, f"{target.plural}/finalizers", "update"))
        meta["resourceVersion"] = self._next_rv()
        self._objects[key] = obj
        self._record(resource, "ADDED", obj)
        return copy.deepcopy(obj)

    def _store(self, resource: Resource, obj: dict[str, Any], event_type: str) -> dict[str, Any]:
        """Write a new version of an existing object; finishes a deletion whose finalizers are all gone."""
        meta = obj["metadata"]
        key = (resource.plural, meta.get("namespace", ""), meta["name"])
        meta["resourceVersion"] = self._next_rv()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._objects.pop(key, None)
            self._record(resource, "DELETED", obj)
            self._collect_garbage(meta["uid"])
        else:
            self._objects[key] = obj
            self._record(resource, event_type, obj)
        return copy.deepcopy(obj)

    def _delete(
        self, resource: Resource, key: tuple[str, str, str], *, orphan: bool = False
    ) -> dict[str, Any]:
        obj = copy.deepcopy(self._objects[key])
        meta = obj["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = _now()
                meta["deletionGracePeriodSeconds"] = 0
                return self._store(resource, obj, "MODIFIED")
            return obj
        del self._objects[key]
        meta["resourceVersion"] = self._next_rv()
        self._record(resource, "DELETED", obj)
        if not orphan:
            self._collect_garbage(meta["uid"])
        return obj

    def _collect_garbage(self, owner_uid: str) -> None:
        """Background propagation: every object owned by `owner_uid` is deleted too."""
        for key, obj in list(self._objects.items()):
            owners = (obj.get("metadata") or {}).get("ownerReferences") or []
            if key in self._objects and any(o.get("uid") == owner_uid for o in owners):
                self._delete(next(r for r in RESOURCES if r.plural == key[0]), key)

    # ---------------------------------------------------------------------------- request handling

    def handle(self, method: str, target: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, Any]:
        """(code, JSON body or text) for one request; a watch returns (200, generator of lines)."""
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        resource, namespace, name, sub = self._route(url.path)
        verb = _verb(method, name, query)
        plural = f"{resource.plural}/{sub}" if sub else resource.plural
        if verb == "create" and name is None:  # the name is in the body: faults and the log match on it
            with contextlib.suppress(ValueError, AttributeError):
                name = (json.loads(body or b"{}").get("metadata") or {}).get("name")
        try:
            late = self._apply_faults(verb, plural, name)
            if verb == "watch":
                code, answer = 200, self._watch(resource, namespace, query)
            else:
                code, answer = self._serve(verb, resource, namespace, name, sub, query, body, headers)
            if late is not None:
                raise late
        except ApiError as err:
            code, answer = err.code, err.status()
        with self._lock:
            self._requests.append(
                Request(
                    method,
                    url.path,
                    verb,
                    resource.group,
                    plural,
                    namespace,
                    name,
                    code,
                    headers.get("User-Agent", ""),
                )
            )
        return code, answer

    def _route(self, path: str) -> tuple[Resource, str | None, str | None, str | None]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _NotFoundPath(path)
        namespace = None
        if len(rest) >= 2 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or (resource := _BY_PATH.get((group, version, rest[0]))) is None:
            raise _NotFoundPath(path)
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if len(rest) > 3 or (sub is not None and sub not in ("status", "log")):
            raise _NotFoundPath(path)
        if not resource.namespaced and namespace is not None:
            raise _NotFoundPath(path)
        if resource.namespaced and name is not None and namespace is None:
            raise _NotFoundPath(path)
        return resource, namespace, name, sub

    def _apply_faults(self, verb: str, plural: str, name: str | None) -> ApiError | None:
        """Raises the matching fault's error, or returns it when it comes after the request is served."""
        with self._lock:
            fault = next((f for f in self._faults if f.matches(verb, plural, name)), None)
            if fault is None:
                return None
            fault.count -= 1
        if fault.code is None:
            fault.held.set()
            fault.release.wait()
            return None
        error = ApiError(fault.code, _REASONS.get(fault.code, "Unknown"), f"injected fault ({fault.code})")
        if fault.after:
            return error
        raise error

    def _serve(
        self,
        verb: str,
        resource: Resource,
        namespace: str | None,
        name: str | None,
        sub: str | None,
        query: Mapping[str, str],
        body: bytes,
        headers: Mapping[str, str],
    ) -> tuple[int, Any]:
        ns = namespace or ""
        with self._lock:
            if verb == "list":
                return 200, self._list(resource, namespace, query)
            if verb == "create":
                return 201, self._create(resource, ns, _json_body(body))
            key = (resource.plural, ns, name or "")
            current = self._objects.get(key)
            if current is None:
                raise ApiError(
                    404,
                    "NotFound",
                    f'{resource.plural} "{name}" not found',
                    {"name": name, "group": resource.group, "kind": resource.plural},
                )
            if verb == "get":
                if sub == "log":
                    return 200, _tail(self._logs.get((ns, name or ""), ""), query)
                return 200, copy.deepcopy(current)
            if verb == "delete":
                options = _json_body(body) if body else {}
                self._check_preconditions(current, options.get("preconditions") or {})
                orphan = (options.get("propagationPolicy") or query.get("propagationPolicy")) == "Orphan"
                return 200, self._delete(resource, key, orphan=orphan)
            if verb == "update":
                wanted = _json_body(body)
            else:
                wanted = self._patched(current, body, headers.get("Content-Type", ""))
            return 200, self._write(resource, current, wanted, sub)

    def _list(self, resource: Resource, namespace: str | None, query: Mapping[str, str]) -> dict[str, Any]:
        labels = label_matcher(query.get("labelSelector"))
        fields = field_matcher(query.get("fieldSelector"), resource.plural)
        items = [
            copy.deepcopy(obj)
            for (plural, ns, _), obj in sorted(self._objects.items())
            if plural == resource.plural
            and namespace in (None, ns)
            and labels((obj.get("metadata") or {}).get("labels") or {})
            and fields(obj)
        ]
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    @staticmethod
    def _check_preconditions(current: Mapping[str, Any], preconditions: Mapping[str, Any]) -> None:
        meta = current["metadata"]
        for field_name in ("uid", "resourceVersion"):
            want = preconditions.get(field_name)
            if want is not None and want != meta.get(field_name):
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: {field_name} in precondition: {want}, {field_name} in object "
                    f"meta: {meta.get(field_name)}",
                )

    @staticmethod
    def _patched(current: dict[str, Any], body: bytes, content_type: str) -> dict[str, Any]:
        patch = _json_body(body)
        kind = content_type.split(";")[0].strip()
        if kind == "application/json-patch+json":
            if not isinstance(patch, list):
                raise ApiError(
                    400, "BadRequest", "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                )
            return json_patch(current, patch)
        if kind in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
            wanted = merge_patch(current, patch)
            # A resourceVersion in the patch is a precondition; none means "whatever is current".
            wanted["metadata"]["resourceVersion"] = (patch.get("metadata") or {}).get(
                "resourceVersion", current["metadata"]["resourceVersion"]
            )
            return wanted
        raise ApiError(
            415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {kind}"
        )

    def _write(
        self, resource: Resource, current: dict[str, Any], wanted: Any, sub: str | None
    ) -> dict[str, Any]:
        if not isinstance(wanted, dict) or not isinstance(wanted.get("metadata"), dict):
            raise ApiError(400, "BadRequest", "the object has no metadata")
        meta, old = wanted["metadata"], current["metadata"]
        if meta.get("name", old["name"]) != old["name"]:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name in the URL")
        rv = meta.get("resourceVersion")
        if rv is None and resource.group not in ("", "coordination.k8s.io"):
            raise ApiError(
                422, "Invalid", "metadata.resourceVersion: Invalid value: must be specified for an update"
            )
        if rv is not None and rv != old["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource.plural} "{old["name"]}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                {"name": old["name"], "group": resource.group, "kind": resource.plural},
            )
        if sub == "status":
            new = copy.deepcopy(current)
            if "status" in wanted:
                new["status"] = copy.deepcopy(wanted["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(wanted)
            new["apiVersion"], new["kind"] = resource.api_version, resource.kind
            for immutable in ("uid", "creationTimestamp", "deletionTimestamp", "namespace", "generation"):
                if immutable in old:
                    new["metadata"][immutable] = old[immutable]
                else:
                    new["metadata"].pop(immutable, None)
            if resource.status_subresource:
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
                else:
                    new.pop("status", None)
            if old.get("deletionTimestamp"):
                added = set(new["metadata"].get("finalizers") or []) - set(old.get("finalizers") or [])
                if added:
                    raise ApiError(
                        422,
                        "Invalid",
                        f"metadata.finalizers: Forbidden: no new finalizers can be added if the object is "
                        f"being deleted, found new finalizers {sorted(added)}",
                    )
            spec_old = {k: v for k, v in current.items() if k not in _SKIP_FOR_GENERATION}
            spec_new = {k: v for k, v in new.items() if k not in _SKIP_FOR_GENERATION}
            new["metadata"]["generation"] = old.get("generation", 1) + (spec_old != spec_new)
        if new == current:
            return copy.deepcopy(current)  # a no-op write keeps the version, as the real server does
        return self._store(resource, new, "MODIFIED")

    # ---------------------------------------------------------------------------- watch

    def _watch(self, resource: Resource, namespace: str | None, query: Mapping[str, str]) -> Iterable[bytes]:
        labels = label_matcher(query.get("labelSelector"))
        fields = field_matcher(query.get("fieldSelector"), resource.plural)
        timeout = float(query.get("timeoutSeconds") or 1800)
        start = query.get("resourceVersion") or "0"

        def matches(plural: str, ns: str, obj: Mapping[str, Any]) -> bool:
            return (
                plural == resource.plural
                and namespace in (None, ns)
                and labels((obj.get("metadata") or {}).get("labels") or {})
                and fields(obj)
            )

        with self._lock:
            if start == "0":
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(obj)}
                    for (plural, ns, _), obj in sorted(self._objects.items())
                    if matches(plural, ns, obj)
                ]
                cursor = self._rv
            else:
                initial, cursor = [], int(start)
            epoch = self._epoch

        def stream() -> Iterable[bytes]:
            nonlocal cursor
            for event in initial:
                yield (json.dumps(event) + "\n").encode()
            deadline = _monotonic() + timeout
            while True:
                with self._lock:
                    if cursor < self._compacted_rv or epoch != self._epoch:
                        gone = ApiError(
                            410, "Expired", f"too old resource version: {cursor} ({self._compacted_rv + 1})"
                        )
                        yield (json.dumps({"type": "ERROR", "object": gone.status()}) + "\n").encode()
                        return
                    events = [e for e in self._history if e.rv > cursor]
                    if not events:
                        left = deadline - _monotonic()
                        if left <= 0 or self._stopping:
                            return
                        self._lock.wait(min(left, 0.5))
                        continue
                    cursor = events[-1].rv
                    chosen = [e for e in events if matches(e.plural, e.namespace, e.obj)]
                for e in chosen:
                    yield (json.dumps({"type": e.type, "object": e.obj}) + "\n").encode()

        return stream()


class _NotFoundPath(Exception):
    pass


def _monotonic() -> float:
    import time

    return time.monotonic()


def _verb(method: str, name: str | None, query: Mapping[str, str]) -> str:
    if method == "GET":
        if name is None:
            return "watch" if query.get("watch") in ("true", "1", "True") else "list"
        return "get"
    if method == "DELETE":
        return "delete" if name is not None else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError as err:
        raise ApiError(400, "BadRequest", f"the request body is not JSON: {err}") from None


def _tail(text: str, query: Mapping[str, str]) -> str:
    if "tailLines" in query:
        lines = text.splitlines(keepends=True)
        text = "".join(lines[-int(query["tailLines"]) :]) if int(query["tailLines"]) > 0 else ""
    if "limitBytes" in query:
        text = text.encode()[: int(query["limitBytes"])].decode(errors="ignore")
    return text


def _handler(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read api.requests()
            pass

        def _dispatch(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                code, answer = api.handle(self.command, self.path, body, dict(self.headers))
            except _NotFoundPath:
                err = ApiError(404, "NotFound", "the server could not find the requested resource")
                code, answer = 404, err.status()
            if isinstance(answer, (dict, list)):
                self._send(code, json.dumps(answer).encode(), "application/json")
            elif isinstance(answer, str):
                self._send(code, answer.encode(), "text/plain")
            else:
                self._stream(answer)

        def _send(self, code: int, data: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, lines: Iterable[bytes]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for line in lines:
                    self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    return Handler
