"""The Kubernetes API on dicts: one wrapper for the operator, its backend (k8s/backend.py) and the CLI.

Decisions:

- Dicts, not the client's generated models: manifests are dicts and are read back as dicts, so every call goes
  through `call_json` (`_preload_content=False`, the JSON parsed here), which also skips the models' slow
  deserialisation of large pod lists.
- `KubeApi` names the client method of each kind and verb it uses, so the RBAC test (tests/k8s/test_rbac.py)
  reads from this package's source which calls the operator makes. The CLI uses the same `KubeApi` for pods
  and logs, and names its own TrainingJob and Event calls in cli/ (they run with the user's rights, not the
  operator's role).
- Every call is bounded by a timeout; a followed log only on connecting (a quiet rank is no failure).
- The log tail: a failed pod's last `LOG_TAIL_LINES` lines, at most `LOG_TAIL_BYTES` (torchrun prints its
  failure summary last, about 10 lines per failed worker); the CLI asks for the tail it shows.
- Errors: `api_error` is an ApiException on one line for the operator's log; `status_body` and `api_message`
  are what the CLI's one map from error to message and exit code (cli/cluster.py) reads.
- Which cluster (`load_configuration`): inside a pod (KUBERNETES_SERVICE_HOST set, no kubeconfig named, no
  context) the pod's service account; else a kubeconfig context, the current one by default. The kubeconfig
  file is named here, not left to the client, which reads KUBECONFIG once when it is first imported.
- The client is imported when first used, not with this module: the CLI imports it at no cost.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

PODGROUP_API = ("scheduling.volcano.sh", "v1beta1", "podgroups")
LOG_TAIL_LINES = 2000
LOG_TAIL_BYTES = 256 << 10
DEFAULT_KUBECONFIG = "~/.kube/config"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
Timeout = float | tuple[float, float | None] | None  # seconds, or (connect, read)


# ------------------------------------------------------------------------------------------------ calls, errors


def call_json(fn: Callable[..., Any], *args: Any, timeout: Timeout = 30.0, **kwargs: Any) -> Any:
    """Call a generated client method and return the parsed JSON body (None when empty)."""
    response = fn(*args, _preload_content=False, _request_timeout=timeout, **kwargs)
    data = response.data
    return json.loads(data) if data else None


def api_error(err: ApiException) -> str:
    """One line from an ApiException: the code, the Status reason and its message."""
    try:
        status = json.loads(err.body or b"{}")
        return f"{err.status} {status.get('reason') or err.reason}: {status.get('message', '')}".strip()
    except (TypeError, ValueError):
        return f"{err.status} {err.reason}"


def status_body(err: Any) -> dict[str, Any]:
    """The Status object an API error carries ({} when its body is something else)."""
    try:
        body = json.loads(err.body or b"{}")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def api_message(err: Any) -> str:
    """The API server's message for a failed call, on one line."""
    return one_line(str(status_body(err).get("message") or err.reason or ""))


def one_line(text: str) -> str:
    """`text` with each run of whitespace (newlines too) made one space: every error stays one line."""
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------ the wrapper


class KubeApi:
    """The calls on an attempt's objects and pods, on dicts. Each kind's methods are named out, so the RBAC test
    can read them. `timeout_seconds` bounds a whole request; `connect_timeout_seconds`, when given, bounds the
    connection alone (the read then has `timeout_seconds`)."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        timeout_seconds: float = 30.0,
        connect_timeout_seconds: float | None = None,
    ):
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.connect_timeout = connect_timeout_seconds
        self.timeout: Timeout = (
            timeout_seconds if connect_timeout_seconds is None else (connect_timeout_seconds, timeout_seconds)
        )

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A generated client method of `core` or `custom`: the parsed JSON body, within the timeout."""
        return call_json(fn, *args, timeout=self.timeout, **kwargs)

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        kind, namespace = obj["kind"], obj["metadata"]["namespace"]
        if kind == "PodGroup":
            return self.call(
                self.custom.create_namespaced_custom_object,
                *PODGROUP_API[:2],
                namespace,
                PODGROUP_API[2],
                obj,
            )
        create = {
            "Pod": self.core.create_namespaced_pod,
            "Service": self.core.create_namespaced_service,
            "ConfigMap": self.core.create_namespaced_config_map,
        }[kind]
        return self.call(create, namespace, obj)

    def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        if kind == "PodGroup":
            answer = self.call(
                self.custom.list_namespaced_custom_object, *PODGROUP_API[:2], namespace, PODGROUP_API[2],
                label_selector=selector,
            )  # fmt: skip
        else:
            list_ = {
                "Pod": self.core.list_namespaced_pod,
                "Service": self.core.list_namespaced_service,
                "ConfigMap": self.core.list_namespaced_config_map,
            }[kind]
            answer = self.call(list_, namespace, label_selector=selector)
        return list(answer.get("items") or [])

    def read(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        if kind == "PodGroup":
            return self.call(
                self.custom.get_namespaced_custom_object, *PODGROUP_API[:2], namespace, PODGROUP_API[2], name
            )
        read = {
            "Pod": self.core.read_namespaced_pod,
            "Service": self.core.read_namespaced_service,
            "ConfigMap": self.core.read_namespaced_config_map,
        }[kind]
        return self.call(read, name, namespace)

    def delete(self, kind: str, namespace: str, name: str, *, grace_seconds: int | None = None) -> bool:
        """False when it was already gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "PodGroup":
                self.call(
                    self.custom.delete_namespaced_custom_object, *PODGROUP_API[:2], namespace, PODGROUP_API[2],
                    name,
                )  # fmt: skip
            elif kind == "Pod":
                self.call(
                    self.core.delete_namespaced_pod, name, namespace, grace_period_seconds=grace_seconds
                )
            else:
                delete = {
                    "Service": self.core.delete_namespaced_service,
                    "ConfigMap": self.core.delete_namespaced_config_map,
                }[kind]
                self.call(delete, name, namespace)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def pod_log(
        self,
        namespace: str,
        name: str,
        container: str,
        *,
        tail_lines: int | None = LOG_TAIL_LINES,
        limit_bytes: int | None = LOG_TAIL_BYTES,
    ) -> str:
        """The container's log: its last `tail_lines` lines, at most `limit_bytes` (None: no bound)."""
        response = self.core.read_namespaced_pod_log(
            name, namespace, container=container, tail_lines=tail_lines, limit_bytes=limit_bytes,
            _preload_content=False, _request_timeout=self.timeout,
        )  # fmt: skip
        return response.data.decode("utf-8", errors="replace")

    def follow_pod_log(self, namespace: str, name: str, container: str, *, tail_lines: int | None) -> Any:
        """The open response of a followed log (`.stream()` yields its bytes as they come); no read timeout."""
        return self.core.read_namespaced_pod_log(
            name, namespace, container=container, follow=True, tail_lines=tail_lines,
            _preload_content=False, _request_timeout=(self.connect_timeout, None),
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------ configuration


class KubeConfigError(Exception):
    """The configuration cannot be loaded: `source` says where it was looked for, `reason` why it failed."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason


class NoSuchContext(LookupError):
    """The kubeconfig has no context of that name."""

    def __init__(self, context: str, kubeconfig: str, contexts: list[str]):
        super().__init__(f"no context named {context!r} in {kubeconfig}")
        self.context, self.kubeconfig, self.contexts = context, kubeconfig, contexts


def load_configuration(
    kubeconfig: str | None = None, *, context: str | None = None, persist: bool = False
) -> tuple[client.Configuration, str | None]:
    """The client configuration and its namespace (the context's, or the service account's; None: not set).

    In a pod (KUBERNETES_SERVICE_HOST set, `kubeconfig` and `context` None) the pod's service account; else the
    kubeconfig file (`kubeconfig`, else ~/.kube/config) at `context`, else its current context. `persist`:
    refreshed credentials are written back to the file. KubeConfigError when it cannot load; NoSuchContext when
    `context` names none of the file's contexts.
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    path = kubeconfig or DEFAULT_KUBECONFIG
    in_cluster = kubeconfig is None and context is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
            own = (
                SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.is_file() else None
            )
        else:
            contexts, chosen = config.list_kube_config_contexts(config_file=path)
            if context is not None:
                chosen = next((c for c in contexts if c.get("name") == context), None)
                if chosen is None:
                    raise NoSuchContext(context, path, sorted(c.get("name", "?") for c in contexts))
            config.load_kube_config(
                config_file=path, context=chosen["name"], client_configuration=configuration,
                persist_config=persist,
            )  # fmt: skip
            own = (chosen.get("context") or {}).get("namespace")
    except (config.ConfigException, OSError, KeyError, TypeError) as err:
        source = "the pod's service account (in-cluster)" if in_cluster else f"kubeconfig {path}"
        raise KubeConfigError(source, str(err)) from None
    return configuration, own


def parse_time(text: str | None) -> datetime | None:
    """A time as the API writes it (RFC 3339, `2026-12-06T17:00:00Z`) or as the store's ISO 8601 form in a
    TrainingJob's status, as an aware UTC datetime; None for none. A time without an offset is UTC."""
    if not text:
        return None
    parsed = datetime.fromisoformat(text)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
