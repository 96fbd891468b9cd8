"""Every TrainingJob in the operator's scope, kept current by one list + watch in a thread.

Decisions:

- The watch restarts from the last resourceVersion seen; 410 Gone (the history moved on) means list again.
- Each pass works on a snapshot (deep copies), so the watch thread never changes an object a pass is reading.
- The operator's own writes go into the cache at once (`put`), unless the watch already brought a newer
  version: the next pass sees the finalizer or status it just wrote.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from k8s.api import api_error, call_json
from k8s.crd import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)


def object_key(obj: Mapping[str, Any]) -> str:
    """`namespace/name` of an object, for messages."""
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


class TrainingJobCache:
    """Every TrainingJob in scope, kept current by list + watch in a thread; `changed` is set on every event."""

    def __init__(
        self, api_client: client.ApiClient, namespace: str | None, *, watch_seconds: int = 300
    ) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.watch_seconds = watch_seconds
        self.changed = threading.Event()
        self.synced = threading.Event()
        self.relists = 0
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trainingjob-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(obj) for _, obj in sorted(self._objects.items())]

    def put(self, obj: Mapping[str, Any]) -> None:
        """Our own write's answer: newer than what the cache holds unless the watch already brought more."""
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            held = self._objects.get(key)
            if held is None or int(held["metadata"]["resourceVersion"]) < int(meta["resourceVersion"]):
                self._objects[key] = copy.deepcopy(dict(obj))

    def _list_call(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if self.namespace is None:
            return self.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL)
        return self.custom.list_namespaced_custom_object, (GROUP, VERSION, self.namespace, PLURAL)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._list()
                self._follow(version)
            except ApiException as err:
                if err.status == 410:
                    log.info("TrainingJob watch expired (410 Gone): listing again")
                    continue
                log.warning("TrainingJob watch: %s", api_error(err))
            except Exception as err:  # a dropped connection, or stop() closing the stream
                if self._stop.is_set():
                    return
                log.warning("TrainingJob watch: %s: %s", type(err).__name__, err)
            self._stop.wait(1.0)

    def _list(self) -> str:
        fn, args = self._list_call()
        answer = call_json(fn, *args)
        objects = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in answer.get("items") or []}
        with self._lock:
            self._objects = objects
        self.relists += 1
        self.synced.set()
        self.changed.set()
        return answer["metadata"]["resourceVersion"]

    def _follow(self, version: str) -> None:
        fn, args = self._list_call()
        while not self._stop.is_set():
            self._watch = watch.Watch()
            for event in self._watch.stream(
                fn, *args, resource_version=version, timeout_seconds=self.watch_seconds
            ):
                obj = event["object"]
                meta = obj["metadata"]
                key = (meta["namespace"], meta["name"])
                with self._lock:
                    if event["type"] == "DELETED":
                        self._objects.pop(key, None)
                    else:
                        self._objects[key] = obj
                version = meta["resourceVersion"]
                self.changed.set()
