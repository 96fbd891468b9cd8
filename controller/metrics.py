"""The controller's own Prometheus metrics: jobs by phase, each job's progress, restarts, goodput, checkpoints,
stragglers and how long failures took to notice, read from the store at scrape time.

The trainer's per-rank metrics (`vlctl_trainer_*`, `trainer.contract.telemetry`) say what each rank is doing
now; these say what the control plane decided and recorded. Alerts and dashboards are checked against both lists.

Decisions:

- One collector reads the store on each scrape, in one read session with a fixed handful of set-based queries
  (never one per job), and keeps nothing between scrapes: every controller replica, and a restarted one, reports
  the same numbers, since they all come from the shared store.
- Per-job series carry `training_job` (the job's name, the trainer's label too, so the two sets join in PromQL).
  A job in a terminal phase is dropped from the per-job and per-rank series `retention_seconds` after it finished
  (1 h by default): long enough for the "job failed" alert to fire and a dashboard to show how the run ended,
  while the number of series stays bounded by the active jobs however long the controller runs.
  `vlctl_controller_jobs{phase}` still counts every job.
- Phase gauges cover every phase with 0 or 1 (the kube-state-metrics convention): `== 1` selects the current
  phase, and a phase change moves the 1 without a series vanishing.
- Counters are counted from the event timeline (restarts by exit class, stragglers flagged), not kept in memory,
  so they survive controller restarts and failover. Per job they only end by the job dropping out.
- The detection-latency histogram has no job label and counts every `Failure` event in the store, so it only
  grows (a shrinking counter would read as a reset and fake an increase).
- Per-rank series (straggler score, flagged) exist only for ranks of jobs in `launching`/`running`, from the
  current attempt's `rank_status` rows: one or two series per rank, next to the ~20 each rank exports itself.
- A store that cannot be read yields `vlctl_controller_store_up 0` and nothing else: the scrape still succeeds,
  so an alert can say why the other series are gone, instead of a bare scrape error.
- Gauges are left out where the store has no value (no ETTR yet, no checkpoint yet): no invented zeros.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from threading import Thread
from typing import Any, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from controller.domain.phases import ACTIVE_PHASES, SUPERVISED_PHASES, EventType, Phase
from controller.goodput import LostCause
from controller.store.models import Checkpoint, Event, Job, NodeHealth, RankStatus, utcnow
from controller.store.session import Store, StoreUnavailable

log = logging.getLogger("controller.metrics")

PREFIX = "vlctl_controller_"
LABEL_TRAINING_JOB = "training_job"  # the trainer's label for the same thing, so series join on it
DEFAULT_RETENTION_SECONDS = 3600.0
# Seconds from a failure to the controller noticing it: a crash shows within a pass (about a second), a hang
# only after its timeout (minutes), so the buckets span both.
DETECTION_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
UNKNOWN_EXIT_CLASS = "Unknown"  # a restart event without an exit class (written before the convention)
STRAGGLER_FLAGGED = "StragglerFlagged"  # reasons of `Straggler` events
NODE_SLOW = "NodeSlow"

MetricKind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True, slots=True)
class ControllerMetricSpec:
    name: str  # the family name; a counter's ends in `_total`, as exposed
    kind: MetricKind
    unit: str  # seconds, unix_seconds, steps, ratio, score, count
    help: str
    labels: tuple[str, ...] = ()

    @property
    def sample_names(self) -> tuple[str, ...]:
        """The names a PromQL query may use for it."""
        if self.kind == "histogram":
            return tuple(f"{self.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return (self.name,)


def _m(name: str, kind: MetricKind, unit: str, help: str, *labels: str) -> ControllerMetricSpec:
    return ControllerMetricSpec(name=PREFIX + name, kind=kind, unit=unit, help=help, labels=labels)


J = LABEL_TRAINING_JOB
METRICS: tuple[ControllerMetricSpec, ...] = (
    _m("store_up", "gauge", "ratio", "1 when the store answered this scrape, else 0 (and no other series)."),
    _m("collect_seconds", "gauge", "seconds", "Time this scrape spent reading the store."),
    _m("jobs", "gauge", "count", "Jobs in the store by phase (every job, every phase).", "phase"),
    _m("excluded_nodes", "gauge", "count", "Nodes excluded for every job (cluster-wide), not expired."),
    _m("job_phase", "gauge", "ratio", "1 for the job's current phase, 0 for the others.", J, "phase"),
    _m("job_step", "gauge", "steps", "Newest step the job reached (from the ranks' telemetry).", J),
    _m("job_total_steps", "gauge", "steps", "Steps the job trains for.", J),
    _m("job_restarts", "gauge", "count", "Every restart of the job so far.", J),
    _m("job_restarts_counted", "gauge", "count", "Restarts that count toward max_restarts.", J),
    _m("job_max_restarts", "gauge", "count", "The spec's fault_tolerance.max_restarts.", J),
    _m("job_ettr", "gauge", "ratio", "Effective training time ratio: productive over wall time.", J),
    _m("job_productive_seconds", "gauge", "seconds", "Productive training time so far.", J),
    _m("job_lost_seconds", "gauge", "seconds", "Wall time lost, by cause.", J, "cause"),
    _m(
        "job_last_checkpoint_step", "gauge", "steps", "Step of the newest committed, resumable checkpoint.", J
    ),
    _m(
        "job_last_checkpoint_timestamp_seconds",
        "gauge",
        "unix_seconds",
        "When the newest committed, resumable checkpoint was committed.",
        J,
    ),
    _m("job_checkpoint_interval_steps", "gauge", "steps", "Checkpoint interval in effect.", J),
    _m("job_progress_timestamp_seconds", "gauge", "unix_seconds", "When the job's step last advanced.", J),
    _m("job_straggler_ranks", "gauge", "count", "Ranks currently flagged as stragglers.", J),
    _m("job_excluded_nodes", "gauge", "count", "Nodes excluded for this job (its own and cluster-wide).", J),
    _m("rank_straggler_score", "gauge", "score", "A rank's latest straggler score.", J, "rank", "node"),
    _m(
        "rank_straggler_flagged",
        "gauge",
        "ratio",
        "1 when the rank is flagged as a straggler.",
        J,
        "rank",
        "node",
    ),
    _m("restarts_total", "counter", "count", "Restarts by exit class.", J, "exit_class"),
    _m("stragglers_flagged_total", "counter", "count", "Ranks flagged as stragglers.", J),
    _m("slow_nodes_flagged_total", "counter", "count", "Nodes flagged as slow.", J),
    _m(
        "failure_detection_seconds",
        "histogram",
        "seconds",
        "Time from a failure to the controller noticing it, by exit class (every job).",
        "exit_class",
    ),
)
METRICS_BY_NAME = {m.name: m for m in METRICS}


@dataclass(kw_only=True, slots=True)
class JobValues:
    """One job's per-job values; None where the store has none."""

    id: int
    name: str
    phase: Phase
    step: int | None = None
    total_steps: int | None = None
    restarts: int = 0
    restarts_counted: int = 0
    max_restarts: int | None = None
    ettr: float | None = None
    productive_seconds: float | None = None
    lost_seconds: dict[str, float] = field(default_factory=dict)
    last_checkpoint_step: int | None = None
    last_checkpoint_time: float | None = None
    checkpoint_interval_steps: int | None = None
    progress_time: float | None = None


@dataclass(frozen=True, slots=True)
class RankValues:
    job: str
    rank: int
    node: str
    straggler_score: float | None
    flagged: bool


@dataclass(frozen=True, slots=True)
class DetectionHistogram:
    exit_class: str
    cumulative: tuple[int, ...]  # per bucket of DETECTION_BUCKETS
    count: int
    sum: float


@dataclass(kw_only=True, slots=True)
class Snapshot:
    """Everything one scrape exports, read in one session."""

    jobs_by_phase: dict[Phase, int]
    jobs: list[JobValues]
    restarts: list[tuple[str, str, int]]  # (job, exit class, count)
    straggler_events: list[tuple[str, str, int]]  # (job, reason, count)
    ranks: list[RankValues]
    job_excluded_nodes: dict[str, int]  # job -> nodes excluded for it, cluster-wide ones included
    cluster_excluded_nodes: int
    detection: list[DetectionHistogram]


def read_snapshot(*, session: Session, now: datetime, retention_seconds: float) -> Snapshot:
    """The scrape's queries, each over a set of jobs."""
    cutoff = now - timedelta(seconds=retention_seconds)
    visible = or_(Job.phase.in_(list(ACTIVE_PHASES)), Job.finished_at >= cutoff)

    jobs_by_phase = dict.fromkeys(Phase, 0)
    for phase, count in session.execute(select(Job.phase, func.count()).group_by(Job.phase)):
        jobs_by_phase[Phase(phase)] = count

    # The newest resumable checkpoint is the one `jobs.last_checkpoint_step` names (unique per job and step).
    newest_ckpt = and_(Checkpoint.job_id == Job.id, Checkpoint.step == Job.last_checkpoint_step)
    job_rows = session.execute(
        select(Job, Checkpoint.committed_at)
        .outerjoin(Checkpoint, newest_ckpt)
        .where(visible)
        .order_by(Job.id)
    )
    jobs = [_job_values(job, committed_at) for job, committed_at in job_rows]
    names = {j.id: j.name for j in jobs}

    # JSON fields are selected in a subquery and grouped outside it: PostgreSQL does not see `data ->> $1` in
    # SELECT and `data ->> $2` in GROUP BY as the same expression.
    restart_events = (
        select(Event.job_id, Event.data["exit_class"].as_string().label("exit_class"))
        .join(Job, Job.id == Event.job_id)
        .where(
            visible,
            Event.type == EventType.PHASE_CHANGED,
            Event.data["to"].as_string() == Phase.RESTARTING.value,
        )
        .subquery()
    )
    # On PostgreSQL each statement sees the newest commits: a job that became visible after the jobs query
    # has no per-job series in this scrape, so its other rows are skipped too (`names` check).
    restarts = [
        (names[job_id], exit_class or UNKNOWN_EXIT_CLASS, count)
        for job_id, exit_class, count in session.execute(
            select(restart_events.c.job_id, restart_events.c.exit_class, func.count()).group_by(
                restart_events.c.job_id, restart_events.c.exit_class
            )
        )
        if job_id in names
    ]

    straggler_events = [
        (names[job_id], reason, count)
        for job_id, reason, count in session.execute(
            select(Event.job_id, Event.reason, func.count())
            .join(Job, Job.id == Event.job_id)
            .where(visible, Event.type == EventType.STRAGGLER)
            .group_by(Event.job_id, Event.reason)
        )
        if job_id in names
    ]

    ranks = [
        RankValues(job=name, rank=rank, node=node, straggler_score=score, flagged=bool(flagged))
        for name, rank, node, score, flagged in session.execute(
            select(Job.name, RankStatus.rank, RankStatus.node, RankStatus.straggler_score, RankStatus.flagged)
            .join(Job, and_(Job.id == RankStatus.job_id, Job.current_attempt == RankStatus.attempt))
            .where(Job.phase.in_(list(SUPERVISED_PHASES)))
            .order_by(Job.name, RankStatus.rank)
        )
    ]

    exclusions = session.execute(
        select(NodeHealth.job_id, NodeHealth.node).where(
            NodeHealth.excluded, or_(NodeHealth.expires_at.is_(None), NodeHealth.expires_at > now)
        )
    ).all()
    cluster_wide = {node for job_id, node in exclusions if job_id is None}
    per_job: dict[str, set[str]] = {j.name: set(cluster_wide) for j in jobs if j.phase in ACTIVE_PHASES}
    for job_id, node in exclusions:
        if job_id in names and names[job_id] in per_job:
            per_job[names[job_id]].add(node)

    return Snapshot(
        jobs_by_phase=jobs_by_phase,
        jobs=jobs,
        restarts=restarts,
        straggler_events=straggler_events,
        ranks=ranks,
        job_excluded_nodes={name: len(nodes) for name, nodes in per_job.items()},
        cluster_excluded_nodes=len(cluster_wide),
        detection=_detection_histograms(session),
    )


def _detection_histograms(session: Session) -> list[DetectionHistogram]:
    failures = (
        select(Event.reason.label("exit_class"), Event.data["detection_seconds"].as_float().label("seconds"))
        .where(Event.type == EventType.FAILURE)
        .subquery()
    )
    seconds = failures.c.seconds
    buckets = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in DETECTION_BUCKETS]
    stmt = (
        select(failures.c.exit_class, func.count(), func.sum(seconds), *buckets)
        .where(seconds.is_not(None))
        .group_by(failures.c.exit_class)
        .order_by(failures.c.exit_class)
    )
    return [
        DetectionHistogram(
            exit_class=exit_class, cumulative=tuple(int(n) for n in counts), count=count, sum=float(total)
        )
        for exit_class, count, total, *counts in session.execute(stmt)
    ]


def _job_values(job: Job, checkpoint_committed_at: datetime | None) -> JobValues:
    spec: Mapping[str, Any] = job.spec or {}
    total_steps = job.total_steps
    if total_steps is None:  # before the controller refreshed progress: the spec says how long it trains
        total_steps = _int_at(spec, "training", "training", "steps")
    return JobValues(
        id=job.id,
        name=job.name,
        phase=Phase(job.phase),
        step=job.current_step,
        total_steps=total_steps,
        restarts=job.num_restarts,
        restarts_counted=job.num_restarts_counted,
        max_restarts=_int_at(spec, "fault_tolerance", "max_restarts"),
        ettr=job.ettr,
        productive_seconds=job.productive_seconds,
        lost_seconds={str(k): float(v) for k, v in (job.lost_seconds or {}).items() if v is not None},
        last_checkpoint_step=job.last_checkpoint_step,
        last_checkpoint_time=_unix(checkpoint_committed_at),
        checkpoint_interval_steps=job.checkpoint_interval_steps,
        progress_time=_unix(job.progress_at),
    )


def _int_at(doc: Mapping[str, Any], *path: str) -> int | None:
    value: Any = doc
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _unix(t: datetime | None) -> float | None:
    return None if t is None else t.timestamp()


def render(snapshot: Snapshot) -> Iterator[Metric]:
    """The snapshot as metric families, in `METRICS` order."""
    # `collect_seconds` is the collector's to add, once the scrape is read.
    fam = {spec.name: _family(spec) for spec in METRICS if spec.name != PREFIX + "collect_seconds"}

    def add(name: str, labels: list[str], value: float | None) -> None:
        if value is not None:
            fam[PREFIX + name].add_metric(labels, value)

    add("store_up", [], 1.0)
    for phase, count in snapshot.jobs_by_phase.items():
        add("jobs", [phase.value], count)
    add("excluded_nodes", [], snapshot.cluster_excluded_nodes)
    for j in snapshot.jobs:
        for phase in Phase:
            add("job_phase", [j.name, phase.value], float(phase == j.phase))
        add("job_step", [j.name], j.step)
        add("job_total_steps", [j.name], j.total_steps)
        add("job_restarts", [j.name], j.restarts)
        add("job_restarts_counted", [j.name], j.restarts_counted)
        add("job_max_restarts", [j.name], j.max_restarts)
        add("job_ettr", [j.name], j.ettr)
        if j.ettr is not None or j.lost_seconds:  # goodput has been computed for it
            add("job_productive_seconds", [j.name], j.productive_seconds)
            # Every cause, zeros included, so stacked panels keep their colours; unknown keys pass through.
            for cause in (*LostCause, *sorted(set(j.lost_seconds) - set(LostCause))):
                add("job_lost_seconds", [j.name, str(cause)], j.lost_seconds.get(str(cause), 0.0))
        add("job_last_checkpoint_step", [j.name], j.last_checkpoint_step)
        add("job_last_checkpoint_timestamp_seconds", [j.name], j.last_checkpoint_time)
        add("job_checkpoint_interval_steps", [j.name], j.checkpoint_interval_steps)
        add("job_progress_timestamp_seconds", [j.name], j.progress_time)
        add("job_excluded_nodes", [j.name], snapshot.job_excluded_nodes.get(j.name))

    flagged: dict[str, int] = defaultdict(int)
    for r in snapshot.ranks:
        add("rank_straggler_score", [r.job, str(r.rank), r.node], r.straggler_score)
        add("rank_straggler_flagged", [r.job, str(r.rank), r.node], float(r.flagged))
        flagged[r.job] += r.flagged
    for j in snapshot.jobs:
        if j.phase in SUPERVISED_PHASES:
            add("job_straggler_ranks", [j.name], flagged.get(j.name, 0))

    for job, exit_class, count in snapshot.restarts:
        add("restarts_total", [job, exit_class], count)
    for job, reason, count in snapshot.straggler_events:
        if reason == STRAGGLER_FLAGGED:
            add("stragglers_flagged_total", [job], count)
        elif reason == NODE_SLOW:
            add("slow_nodes_flagged_total", [job], count)

    histogram = fam[PREFIX + "failure_detection_seconds"]
    for h in snapshot.detection:
        buckets = [(floatToGoString(b), n) for b, n in zip(DETECTION_BUCKETS, h.cumulative, strict=True)]
        histogram.add_metric([h.exit_class], [*buckets, ("+Inf", h.count)], h.sum)

    yield from fam.values()


def _family(spec: ControllerMetricSpec) -> Metric:
    labels = list(spec.labels)
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=labels)
    if spec.kind == "histogram":
        return HistogramMetricFamily(spec.name, spec.help, labels=labels)
    return GaugeMetricFamily(spec.name, spec.help, labels=labels)


class ControllerCollector(Collector):
    """Reads the store on every `collect()` (every scrape)."""

    def __init__(
        self,
        store: Store,
        *,
        retention_seconds: float = DEFAULT_RETENTION_SECONDS,
        clock: Callable[[], datetime] = utcnow,
    ):
        if retention_seconds < 0:
            raise ValueError(f"retention_seconds: must be >= 0, got {retention_seconds}")
        self._store = store
        self._retention_seconds = retention_seconds
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        try:
            with self._store.read() as session:
                snapshot = read_snapshot(
                    session=session, now=self._clock(), retention_seconds=self._retention_seconds
                )
        except (SQLAlchemyError, StoreUnavailable) as err:
            log.warning("metrics: cannot read the store at %s: %s", self._store.url, str(err).splitlines()[0])
            down = _family(METRICS_BY_NAME[PREFIX + "store_up"])
            down.add_metric([], 0.0)
            yield down
            return
        yield from render(snapshot)
        elapsed = _family(METRICS_BY_NAME[PREFIX + "collect_seconds"])
        elapsed.add_metric([], time.perf_counter() - started)
        yield elapsed

    def describe(self) -> Iterator[Metric]:
        # Registering must not query the store (it may not be up yet); the names are known statically.
        return iter([_family(spec) for spec in METRICS])


def build_registry(
    store: Store, *, retention_seconds: float = DEFAULT_RETENTION_SECONDS, process_metrics: bool = True
) -> CollectorRegistry:
    """A registry of its own (never prometheus_client's global one) with the controller's collector and, by
    default, the standard `process_*` metrics of this process."""
    registry = CollectorRegistry()
    registry.register(ControllerCollector(store, retention_seconds=retention_seconds))
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry


def serve_metrics(
    store: Store,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    retention_seconds: float = DEFAULT_RETENTION_SECONDS,
) -> tuple[WSGIServer, Thread]:
    """Serve `/metrics` on host:port in daemon threads; port 0 picks a free one (`server.server_port`).
    Stop with `server.shutdown(); server.server_close()`."""
    registry = build_registry(store, retention_seconds=retention_seconds)
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise RuntimeError(f"metrics.port: cannot serve metrics on {host}:{port}: {err.strerror}") from err
