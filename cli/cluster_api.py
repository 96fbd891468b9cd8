"""The connection to a Kubernetes cluster for the CLI's job commands (cli/cluster.py, cli/cluster_logs.py): the
kubeconfig context or the pod's service account, the namespace, and API failures as one-line errors.

Decisions:

- Which cluster: the kubeconfig's current context (KUBECONFIG, else ~/.kube/config), or `--context NAME`; inside
  a pod (KUBERNETES_SERVICE_HOST set, no KUBECONFIG, no `--context`) the pod's service account. Namespace:
  `--namespace`, else a TrainingJob file's own, else the context's, else "default".
- Exit codes, as for the store: 2 bad input (unknown job, context or namespace, a name taken), 3 the API server
  cannot be reached (the line names its URL), 1 the request failed (403 names verb and resource).
- Calls go through k8s/api.py's `KubeApi`, as the operator's do. The Kubernetes client is imported only when a
  command goes to a cluster.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from k8s.api import (
    KubeApi,
    KubeConfigError,
    NoSuchContext,
    api_message,
    load_configuration,
    one_line,
    status_body,
)
from k8s.crd import API_VERSION, GROUP, KIND, PLURAL, VERSION

from .errors import EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USER_ERROR, CliError
from .options import Target

DEFAULT_NAMESPACE = "default"
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 60.0
RESOURCE = f"{PLURAL}.{GROUP}"


# ------------------------------------------------------------------------------------------------ connection


@dataclass(frozen=True, slots=True)
class Cluster:
    """A connection to the cluster (k8s.api's `KubeApi`), its server's URL, and the namespace commands use."""

    kube: KubeApi
    server: str
    namespace: str


def connect(where: Target, *, file_namespace: str | None = None) -> Cluster:
    """Load the kubeconfig context (or the pod's service account) and choose the namespace."""
    from kubernetes import client

    try:
        configuration, own = load_configuration(os.environ.get("KUBECONFIG"), context=where.context)
    except NoSuchContext as err:
        names = ", ".join(err.contexts) or "none"
        raise CliError(
            f"--context: no context named {err.context!r} in {err.kubeconfig} (contexts: {names})"
        ) from None
    except KubeConfigError as err:
        raise CliError(
            f"{err.source}: cannot load the Kubernetes configuration ({one_line(err.reason)})"
        ) from None
    api_client = client.ApiClient(configuration)
    api_client.user_agent = "vlctl"
    return Cluster(
        kube=KubeApi(
            api_client, timeout_seconds=READ_TIMEOUT_SECONDS, connect_timeout_seconds=CONNECT_TIMEOUT_SECONDS
        ),
        server=configuration.host,
        namespace=where.namespace or file_namespace or own or DEFAULT_NAMESPACE,
    )


@contextmanager
def api_call(cl: Cluster, verb: str, resource: str, name: str | None = None) -> Iterator[None]:
    """API failures as one-line CliErrors with their exit codes (see the module docstring)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as err:
        raise _api_failure(err, cl, verb, resource, name) from None
    except (urllib3.exceptions.HTTPError, OSError) as err:  # refused, unresolvable, timed out, cut off
        raise _unreachable(cl, err) from None


def _unreachable(cl: Cluster, err: BaseException) -> CliError:
    reason = getattr(err, "reason", None) or err
    why = re.sub(r"<[^>]*>:\s*", "", str(reason))  # urllib3 names the connection object first
    return CliError(
        f"cannot reach the Kubernetes API server at {cl.server}: {one_line(why)}", EXIT_UNAVAILABLE
    )


def _api_failure(err: Any, cl: Cluster, verb: str, resource: str, name: str | None) -> CliError:
    body = status_body(err)
    details = body.get("details") or {}
    message = api_message(err)
    what = f"{verb} {resource}" + (f" {name}" if name else "") + f" in namespace {cl.namespace}"
    code = err.status
    if code == 404 and details.get("kind") == "namespaces":
        return CliError(f"no namespace {details.get('name')!r} in the cluster at {cl.server}")
    if code == 404 and resource == RESOURCE and name is not None and details.get("name") == name:
        return CliError(f"no TrainingJob named {name!r} in namespace {cl.namespace}")
    if code == 404 and not details.get("name") and resource == RESOURCE:
        return CliError(
            f"{what}: the API server at {cl.server} does not serve {API_VERSION} {KIND}: is the CRD installed "
            "(kubectl apply -k k8s/base)?",
            EXIT_FAILURE,
        )
    if code == 409 and verb == "create":
        return CliError(f"TrainingJob {name!r} already exists in namespace {cl.namespace}")
    if code == 422:
        return CliError(f"{what}: the API server refused it: {message}")
    if code == 401:
        return CliError(
            f"{what}: unauthorized: the API server at {cl.server} refused the credentials", EXIT_FAILURE
        )
    if code == 403:
        return CliError(f"{what}: forbidden ({message})", EXIT_FAILURE)
    if code == 0:  # the client's own failure before any answer (TLS)
        return CliError(f"cannot reach the Kubernetes API server at {cl.server}: {message}", EXIT_UNAVAILABLE)
    if code in (502, 503, 504):  # a proxy or load balancer in front of it answered
        return CliError(
            f"cannot reach the Kubernetes API server at {cl.server}: {code} {message}", EXIT_UNAVAILABLE
        )
    return CliError(f"{what}: {code} {body.get('reason') or err.reason}: {message}", EXIT_FAILURE)


def get_job(cl: Cluster, name: str) -> dict[str, Any]:
    with api_call(cl, "get", RESOURCE, name):
        return cl.kube.call(
            cl.kube.custom.get_namespaced_custom_object, GROUP, VERSION, cl.namespace, PLURAL, name
        )


def job_or_none(cl: Cluster, name: str) -> dict[str, Any] | None:
    """The TrainingJob named `name`, or None when there is none."""
    try:
        return get_job(cl, name)
    except CliError as err:
        if err.exit_code != EXIT_USER_ERROR:
            raise
        return None
