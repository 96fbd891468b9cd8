"""`vlctl operator`: run the Kubernetes operator (in the cluster, as the Deployment in k8s/base does).

Every option has an environment variable, which is how the Deployment configures it (k8s/base/deployment.yaml).
The Kubernetes API is reached with the pod's service account in a cluster, else through a kubeconfig
(`--kubeconfig`, KUBECONFIG, ~/.kube/config). SIGTERM or Ctrl-C: the gangs keep running, the store claims and
the Lease are handed over, so the standby replica takes over at once.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from . import process
from .errors import EXIT_USER_ERROR, CliError
from .output import stderr


def _kube_configuration(kubeconfig: Path | None):
    from k8s.api import KubeConfigError, load_configuration

    try:
        configuration, _ = load_configuration(str(kubeconfig) if kubeconfig else None, persist=True)
    except KubeConfigError as err:
        raise CliError(
            f"kubeconfig: cannot load the Kubernetes configuration ({err.reason})", EXIT_USER_ERROR
        ) from None
    return configuration


def operator(
    image: Annotated[
        str, typer.Option(envvar="VLCTL_TRAINER_IMAGE", help="the trainer image every pod runs")
    ],
    identity: Annotated[
        str | None,
        typer.Option(envvar="VLCTL_OPERATOR_POD", help="this replica's name (leader election, store claims)"),
    ] = None,
    lease_namespace: Annotated[
        str, typer.Option(envvar="VLCTL_OPERATOR_NAMESPACE", help="namespace of the leader-election Lease")
    ] = "vlctl-system",
    namespace: Annotated[
        str | None,
        typer.Option(
            envvar="VLCTL_WATCH_NAMESPACE", help="TrainingJobs of this namespace only (default: all)"
        ),
    ] = None,
    gang: Annotated[
        str, typer.Option(envvar="VLCTL_GANG_SCHEDULER", help="gang admission: volcano, kueue or none")
    ] = "none",
    queue: Annotated[
        str | None, typer.Option(envvar="VLCTL_GANG_QUEUE", help="the Volcano queue or Kueue LocalQueue")
    ] = None,
    scheduling_timeout: Annotated[
        float | None,
        typer.Option(
            envvar="VLCTL_SCHEDULING_TIMEOUT",
            help="seconds a gang may wait for all its pods to be scheduled before it is restarted; 0: forever "
            "(default: 300 without a gang scheduler; forever with volcano or kueue, whose queue admits it whole)",
        ),
    ] = None,
    telemetry: Annotated[
        str,
        typer.Option(
            envvar="VLCTL_TELEMETRY", help="read rank metrics from the pods (endpoints) or prometheus"
        ),
    ] = "endpoints",
    prometheus_url: Annotated[
        str | None,
        typer.Option(envvar="VLCTL_PROMETHEUS_URL", help="Prometheus server for --telemetry prometheus"),
    ] = None,
    cordon_excluded_nodes: Annotated[
        bool,
        typer.Option(
            envvar="VLCTL_CORDON_EXCLUDED_NODES",
            help="cordon a node excluded as a straggler (needs k8s/base/optional/node-cordon.yaml)",
        ),
    ] = False,
    poll_seconds: Annotated[float, typer.Option(help="seconds between reconcile passes")] = 1.0,
    lease_seconds: Annotated[float, typer.Option(help="leader-election lease duration")] = 15.0,
    renew_deadline: Annotated[
        float, typer.Option(help="the leader stops acting after this long unrenewed")
    ] = 10.0,
    retry_seconds: Annotated[float, typer.Option(help="seconds between lease renewals or attempts")] = 2.0,
    claim_lease_seconds: Annotated[float, typer.Option(help="lease on the store's job claims")] = 30.0,
    cancel_grace_seconds: Annotated[
        float, typer.Option(help="SIGTERM grace when a gang is stopped (the trainer saves a checkpoint)")
    ] = 120.0,
    status_interval: Annotated[
        float, typer.Option(help="progress-only status updates at most this often (seconds)")
    ] = 10.0,
    watch_seconds: Annotated[int, typer.Option(help="length of one TrainingJob watch request")] = 300,
    runs_root: Annotated[
        Path | None, typer.Option(help="where attempt configurations are written (default: the data folder)")
    ] = None,
    health_port: Annotated[
        int, typer.Option(envvar="VLCTL_OPERATOR_HEALTH_PORT", help="/healthz port; 0: off")
    ] = 8081,
    metrics_port: Annotated[
        int, typer.Option(envvar="VLCTL_OPERATOR_METRICS_PORT", help="the store's Prometheus metrics; 0: off")
    ] = 9400,
    bind: Annotated[str, typer.Option(help="address for /healthz and /metrics")] = "0.0.0.0",
    kubeconfig: Annotated[
        Path | None, typer.Option(envvar="KUBECONFIG", help="kubeconfig outside a cluster")
    ] = None,
) -> None:
    """Run the TrainingJob operator: leader election, then reconcile TrainingJobs through the controller."""
    process.long_running()
    from controller.reconciler import ControllerConfig
    from k8s.backend import GANG_MODES, METRICS_SOURCES
    from k8s.operator import Operator, OperatorConfig, serve_health

    from .store import store

    if gang not in GANG_MODES:
        raise CliError(f"--gang: must be one of {', '.join(GANG_MODES)}, got {gang!r}")
    if telemetry not in METRICS_SOURCES:
        raise CliError(f"--telemetry: must be one of {', '.join(METRICS_SOURCES)}, got {telemetry!r}")
    if scheduling_timeout is None:
        scheduling_timeout = 300.0 if gang == "none" else 0.0
    if scheduling_timeout < 0:
        raise CliError(f"--scheduling-timeout: must be >= 0, got {scheduling_timeout}")
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    controller_config = ControllerConfig(
        lease_seconds=claim_lease_seconds, cancel_grace_seconds=cancel_grace_seconds
    )
    if runs_root is not None:
        controller_config.runs_root = runs_root
    config = OperatorConfig(
        identity=identity or socket.gethostname(),
        image=image,
        lease_namespace=lease_namespace,
        watch_namespace=namespace or None,
        gang=gang,  # type: ignore[arg-type]
        queue=queue or None,
        scheduling_timeout_seconds=scheduling_timeout or None,
        metrics=telemetry,  # type: ignore[arg-type]
        prometheus_url=prometheus_url,
        poll_seconds=poll_seconds,
        lease_seconds=lease_seconds,
        renew_deadline_seconds=renew_deadline,
        retry_seconds=retry_seconds,
        watch_seconds=watch_seconds,
        status_interval_seconds=status_interval,
        cordon_excluded_nodes=cordon_excluded_nodes,
        controller=controller_config,
    )
    configuration = _kube_configuration(kubeconfig)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with store() as db:
        op = Operator(db, configuration, config)
        servers = []
        if health_port:
            servers.append(serve_health(op, bind, health_port))
        if metrics_port:
            from controller.metrics import serve_metrics

            servers.append(serve_metrics(db, bind, metrics_port)[0])
        scope = f"namespace {config.watch_namespace}" if config.watch_namespace else "all namespaces"
        stderr.print(
            f"operator {config.identity}: TrainingJobs in {scope}, lease {lease_namespace}/{config.lease_name}",
            highlight=False,
        )
        try:
            op.run(stop)
        finally:
            for server in servers:
                server.shutdown()
    stderr.print(
        "operator stopped; running jobs keep training and the next leader takes them", highlight=False
    )


def register(app: typer.Typer) -> None:
    app.command(name="operator")(operator)


if (
    __name__ == "__main__"
):  # `python -m cli.operator ...`: the command alone (tests run it as its own process)
    standalone = typer.Typer(pretty_exceptions_enable=False)
    standalone.command()(operator)
    try:
        standalone()
    except CliError as err:
        stderr.print(f"error: {err}", markup=False, highlight=False)
        sys.exit(err.exit_code)
