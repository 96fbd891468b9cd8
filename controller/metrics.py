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
  current attempt's `rank_status` rows: two series per rank for a job of up to RANK_SERIES_MAX ranks; a larger
  job gets them for its flagged ranks and its highest scores only (`ranks_with_series`), so the page stays
  bounded at 16,384 ranks while the straggler alert (`flagged == 1`) and the dashboard's
  top scores still see what they look for; every rank's detail is on its own endpoint.
- A store that cannot be read yields `vlctl_controller_store_up 0` and nothing else: the scrape still succeeds,
  so an alert can say why the other series are gone, instead of a bare scrape error.
- Gauges are left out where the store has no value (no ETTR yet, no checkpoint yet): no invented zeros.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from threading import Thread
from typing import Literal
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
from sqlalchemy import case, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from controller.domain.phases import ACTIVE_PHASES, SUPERVISED_PHASES, EventType, Phase
from controller.goodput import LostCause
from controller.store.models import Event, Job, NodeHealth
from controller.store.session import Store, StoreUnavailable
from controller.store.tables import utcnow
from controller.views import JobView, RankView, read_job_views

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


RANK_SERIES_MAX = 64  # per job: past this many ranks, the flagged ones and the highest scores only


def ranks_with_series(ranks: list[RankView]) -> list[RankView]:
    """The ranks of one job that get per-rank series (the module's decision): all of a small job's; of a larger
    one, every flagged rank and then the highest straggler scores, up to RANK_SERIES_MAX in all (more only when
    more are flagged), in rank order."""
    if len(ranks) <= RANK_SERIES_MAX:
        return ranks
    flagged = [r for r in ranks if r.flagged]
    others = sorted(
        (r for r in ranks if not r.flagged and r.straggler_score is not None),
        key=lambda r: (-r.straggler_score, r.rank),  # type: ignore[operator]
    )
    return sorted([*flagged, *others[: max(0, RANK_SERIES_MAX - len(flagged))]], key=lambda r: r.rank)


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
    jobs: list[JobView]  # with their ranks: the current attempt's rows of supervised jobs, none for others
    restarts: list[tuple[str, str, int]]  # (job, exit class, count)
    straggler_events: list[tuple[str, str, int]]  # (job, reason, count)
    cluster_excluded_nodes: int
    detection: list[DetectionHistogram]


def read_snapshot(*, session: Session, now: datetime, retention_seconds: float) -> Snapshot:
    """The scrape's queries, each over a set of jobs."""
    cutoff = now - timedelta(seconds=retention_seconds)
    visible = or_(Job.phase.in_(list(ACTIVE_PHASES)), Job.finished_at >= cutoff)

    jobs_by_phase = dict.fromkeys(Phase, 0)
    for phase, count in session.execute(select(Job.phase, func.count()).group_by(Job.phase)):
        jobs_by_phase[Phase(phase)] = count

    # The per-job values are the jobs' views (controller/views.py), read for all visible jobs at once.
    jobs = read_job_views(session, phases=ACTIVE_PHASES, finished_since=cutoff, now=now)
    names = {j.name for j in jobs}

    # JSON fields are selected in a subquery and grouped outside it: PostgreSQL does not see `data ->> $1` in
    # SELECT and `data ->> $2` in GROUP BY as the same expression.
    restart_events = (
        select(Job.name.label("job"), Event.data["exit_class"].as_string().label("exit_class"))
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
        (job, exit_class or UNKNOWN_EXIT_CLASS, count)
        for job, exit_class, count in session.execute(
            select(restart_events.c.job, restart_events.c.exit_class, func.count()).group_by(
                restart_events.c.job, restart_events.c.exit_class
            )
        )
        if job in names
    ]

    straggler_events = [
        (job, reason, count)
        for job, reason, count in session.execute(
            select(Job.name, Event.reason, func.count())
            .join(Job, Job.id == Event.job_id)
            .where(visible, Event.type == EventType.STRAGGLER)
            .group_by(Job.name, Event.reason)
        )
        if job in names
    ]
    cluster_wide = session.scalar(
        select(func.count(func.distinct(NodeHealth.node))).where(
            NodeHealth.excluded,
            NodeHealth.job_id.is_(None),
            or_(NodeHealth.expires_at.is_(None), NodeHealth.expires_at > now),
        )
    )

    return Snapshot(
        jobs_by_phase=jobs_by_phase,
        jobs=jobs,
        restarts=restarts,
        straggler_events=straggler_events,
        cluster_excluded_nodes=int(cluster_wide or 0),
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
        assert j.phase is not None  # a store job always has one
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
        ckpt = j.last_checkpoint
        add("job_last_checkpoint_step", [j.name], None if ckpt is None else ckpt.step)
        add(
            "job_last_checkpoint_timestamp_seconds",
            [j.name],
            None if ckpt is None else _unix(ckpt.committed_at),
        )
        add("job_checkpoint_interval_steps", [j.name], j.checkpoint_interval_steps)
        add("job_progress_timestamp_seconds", [j.name], _unix(j.progress_at))
        if j.phase in ACTIVE_PHASES:  # nodes excluded for it, cluster-wide ones included
            add("job_excluded_nodes", [j.name], len(j.excluded_nodes))

    # Per-rank series: the current attempt's ranks of jobs being supervised.
    for j in snapshot.jobs:
        if j.phase not in SUPERVISED_PHASES:
            continue
        ranks = [r for r in j.ranks or () if r.attempt == j.attempt]
        for r in ranks_with_series(ranks):
            add("rank_straggler_score", [j.name, str(r.rank), r.node], r.straggler_score)
            add("rank_straggler_flagged", [j.name, str(r.rank), r.node], float(r.flagged))
        add("job_straggler_ranks", [j.name], sum(r.flagged for r in ranks))

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
