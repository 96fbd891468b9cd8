"""The operator's settings: one typed config, built by `vlctl operator` (cli/operator.py) from its options.

Every option the Deployment sets has an environment variable (the comment beside each field names it); the
rest keep their defaults in a cluster. The variables, their defaults and what each one changes are listed in
k8s/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.reconciler import ControllerConfig
from k8s.backend import GangMode, MetricsSource

LEASE_NAME = "vlctl-operator"
COMPONENT = "vlctl-operator"  # the operator's user agent and its Events' source


@dataclass(kw_only=True)
class OperatorConfig:
    identity: str  # leader-election identity and the controller's id (the pod's name): VLCTL_OPERATOR_POD
    image: str  # the trainer image: VLCTL_TRAINER_IMAGE
    lease_namespace: str = "vlctl-system"  # VLCTL_OPERATOR_NAMESPACE
    lease_name: str = LEASE_NAME
    watch_namespace: str | None = None  # None: TrainingJobs in every namespace; VLCTL_WATCH_NAMESPACE
    gang: GangMode = "none"  # VLCTL_GANG_SCHEDULER
    queue: str | None = None  # the Volcano queue or Kueue LocalQueue: VLCTL_GANG_QUEUE
    scheduling_timeout_seconds: float | None = 300.0  # None: wait forever; VLCTL_SCHEDULING_TIMEOUT
    metrics: MetricsSource = "endpoints"  # VLCTL_TELEMETRY
    prometheus_url: str | None = None  # VLCTL_PROMETHEUS_URL
    poll_seconds: float = 1.0
    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0
    watch_seconds: int = 300
    status_interval_seconds: float = 10.0  # progress and ETTR alone are written at most this often
    cordon_excluded_nodes: bool = False  # needs optional/node-cordon.yaml; VLCTL_CORDON_EXCLUDED_NODES
    controller: ControllerConfig = field(default_factory=ControllerConfig)

    def __post_init__(self) -> None:
        if not self.poll_seconds > 0:
            raise ValueError(f"poll_seconds: must be > 0, got {self.poll_seconds}")
        if self.watch_seconds < 1:
            raise ValueError(f"watch_seconds: must be >= 1, got {self.watch_seconds}")
        self.controller.controller_id = self.identity
        self.controller.poll_seconds = self.poll_seconds
