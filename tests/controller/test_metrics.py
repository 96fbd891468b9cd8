"""The controller's Prometheus metrics, scraped over HTTP from a store filled through the state machine and the
repository functions, on SQLite and PostgreSQL.

`populate_store` builds a store in which every alert of k8s/base/monitoring/prometheusrule.yaml has something
to fire on; tests/k8s/test_monitoring.py serves the same store to a real Prometheus.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString
from sqlalchemy import event

from controller import states
from controller.domain.phases import EventType, Phase
from controller.metrics import DETECTION_BUCKETS, METRICS_BY_NAME, PREFIX, serve_metrics
from controller.store import Job, Store, StoreConfig, create_job, open_store, records
from controller.store.claims import claim_jobs
from controller.store.models import RankStatus
from controller.store.repo import append_event
from controller.store.tables import utcnow

CONTROLLER = "ctl-metrics"
TRAIN_JOB = "vl-train"  # running, with restarts, a straggler, a stale checkpoint and a low ETTR
FAILED_JOB = "vl-broken"  # failed ten minutes ago: still exported
OLD_JOB = "vl-old"  # succeeded three hours ago: past the retention, dropped from per-job series
QUEUED_JOB = "vl-queued"  # pending
# (exit class, counts toward max_restarts, detection seconds), in the order the restarts happen.
RESTARTS = [
    ("Crash", True, 0.8),
    ("Hang", True, 45.0),
    ("Crash", True, 2.5),
    ("StragglerExcluded", True, 12.0),
    ("Preempted", False, 3.0),
]
MAX_RESTARTS = 5
TOTAL_STEPS = 1000
CURRENT_STEP = 900
INTERVAL_STEPS = 50
LAST_CHECKPOINT_STEP = 200
ETTR = 0.6
LOST = {"startup": 600.0, "detection": 300.0, "restart": 1200.0}
STRAGGLER_RANK = 3


def _spec(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "fault_tolerance": {"max_restarts": MAX_RESTARTS},
        "training": {"training": {"steps": TOTAL_STEPS}},
    }


def _failure(session, job: Job, exit_class: str, seconds: float, now: datetime) -> None:
    append_event(
        session=session,
        job=job,
        type=EventType.FAILURE,
        reason=exit_class,
        data={"exit_class": exit_class, "detection_seconds": seconds, "step": 123, "ranks": [0]},
        now=now,
    )


def populate_store(store: Store, now: datetime) -> None:
    """Four jobs, written the way the controller writes them (state machine, repo and records functions)."""
    t0 = now - timedelta(hours=5)
    with store.transaction() as s:
        train, broken, old = (
            create_job(session=s, name=n, spec=_spec(n), now=t0) for n in (TRAIN_JOB, FAILED_JOB, OLD_JOB)
        )
        create_job(session=s, name=QUEUED_JOB, spec=_spec(QUEUED_JOB), now=now)
        claim_jobs(session=s, controller_id=CONTROLLER, lease_seconds=86400, limit=10, now=t0)

        def launch(job: Job, at: datetime) -> None:
            states.launch(job, session=s, controller_id=CONTROLLER, nodes=["node-a", "node-b"], now=at)
            states.mark_running(job, session=s, now=at)

        old_at = now - timedelta(hours=3)
        launch(old, old_at)
        states.succeed(old, session=s, now=old_at)

        launch(broken, now - timedelta(minutes=20))
        _failure(s, broken, "ConfigError", 0.3, now - timedelta(minutes=10))
        states.fail(
            broken, session=s, message="bad config", exit_class="ConfigError", now=now - timedelta(minutes=10)
        )

        at = now - timedelta(hours=2)
        launch(train, at)
        for exit_class, counted, detection in RESTARTS:
            at += timedelta(minutes=10)
            _failure(s, train, exit_class, detection, at)
            states.restart(train, session=s, exit_class=exit_class, counts_toward_limit=counted, now=at)
            launch(train, at + timedelta(minutes=1))

        records.record_checkpoint(
            session=s,
            job=train,
            step=100,
            uri="file:///ckpt/step-100",
            committed=True,
            now=now - timedelta(minutes=50),
        )
        records.record_checkpoint(
            session=s,
            job=train,
            step=LAST_CHECKPOINT_STEP,
            uri="file:///ckpt/step-200",
            committed=True,
            now=now - timedelta(minutes=40),
        )
        # Saved but never committed: not a checkpoint to resume from, so it changes neither step nor time.
        records.record_checkpoint(
            session=s, job=train, step=300, uri="file:///ckpt/step-300", committed=False, now=now
        )
        records.record_goodput(session=s, job=train, productive_seconds=3000.0, lost_seconds=LOST, ettr=ETTR)
        train.current_step = CURRENT_STEP
        train.progress_at = now - timedelta(seconds=5)
        train.checkpoint_interval_steps = INTERVAL_STEPS

        for rank in range(4):
            flagged = rank == STRAGGLER_RANK
            s.add(
                RankStatus(
                    job_id=train.id,
                    attempt=train.current_attempt,
                    rank=rank,
                    node="node-a" if rank < 2 else "node-b",
                    pid=1000 + rank,
                    step=CURRENT_STEP,
                    last_progress_at=now,
                    own_work_s=1.5 if flagged else 1.0,
                    straggler_score=6.2 if flagged else 0.1 * rank,
                    flagged=flagged,
                    updated_at=now,
                )
            )
        for _ in range(2):
            append_event(
                session=s,
                job=train,
                type=EventType.STRAGGLER,
                reason="StragglerFlagged",
                data={
                    "rank": STRAGGLER_RANK,
                    "node": "node-b",
                    "score": 6.2,
                    "slowdown": 1.5,
                    "phase": "forward",
                },
                now=now,
            )
        append_event(
            session=s, job=train, type=EventType.STRAGGLER, reason="NodeSlow", data={"node": "node-b"}
        )
        records.exclude_node(session=s, node="node-c", reason="StragglerExcluded", job=train, now=now)
        records.exclude_node(session=s, node="node-z", reason="Maintenance", now=now)
        records.exclude_node(
            session=s, node="node-y", reason="Maintenance", expires_at=now - timedelta(minutes=1)
        )


@pytest.fixture
def populated(migrated_store: Store) -> Store:
    populate_store(migrated_store, utcnow())
    return migrated_store


@pytest.fixture
def metrics_url(populated: Store) -> Iterator[str]:
    server, thread = serve_metrics(populated, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[Samples, dict[str, str]]:
    """(value by (sample name, labels), type by family name)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((PREFIX + name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == PREFIX + name}


def test_jobs_by_phase_and_per_job_values(metrics_url: str) -> None:
    samples, _ = scrape(metrics_url)
    assert value(samples, "store_up") == 1.0
    by_phase = {dict(k)["phase"]: v for k, v in series(samples, "jobs").items()}
    assert by_phase == {p.value: 0.0 for p in Phase} | {
        "running": 1.0,
        "failed": 1.0,
        "succeeded": 1.0,
        "pending": 1.0,
    }

    job = {"training_job": TRAIN_JOB}
    phases = {
        dict(k)["phase"]: v
        for k, v in series(samples, "job_phase").items()
        if dict(k)["training_job"] == TRAIN_JOB
    }
    assert phases == {p.value: float(p == Phase.RUNNING) for p in Phase}
    assert value(samples, "job_phase", training_job=FAILED_JOB, phase="failed") == 1.0
    assert value(samples, "job_step", **job) == CURRENT_STEP
    assert value(samples, "job_total_steps", **job) == TOTAL_STEPS  # from the spec: the column is not set yet
    assert value(samples, "job_restarts", **job) == len(RESTARTS)
    assert value(samples, "job_restarts_counted", **job) == sum(counted for _, counted, _ in RESTARTS)
    assert value(samples, "job_max_restarts", **job) == MAX_RESTARTS
    assert value(samples, "job_ettr", **job) == pytest.approx(ETTR)
    assert value(samples, "job_productive_seconds", **job) == 3000.0
    lost = {dict(k)["cause"]: v for k, v in series(samples, "job_lost_seconds").items()}
    assert lost == {"startup": 600.0, "detection": 300.0, "restart": 1200.0, "recomputed_steps": 0.0} | {
        "in_place_recovery": 0.0,
        "checkpoint_stall": 0.0,
        "straggler_slowdown": 0.0,
        "other": 0.0,
    }
    assert value(samples, "job_last_checkpoint_step", **job) == LAST_CHECKPOINT_STEP
    committed = value(samples, "job_last_checkpoint_timestamp_seconds", **job)
    assert committed == pytest.approx((utcnow() - timedelta(minutes=40)).timestamp(), abs=120)
    assert value(samples, "job_checkpoint_interval_steps", **job) == INTERVAL_STEPS
    assert value(samples, "job_progress_timestamp_seconds", **job) == pytest.approx(
        utcnow().timestamp(), abs=120
    )
    # Excluded for this job (node-c) and for every job (node-z); node-y's exclusion has expired.
    assert value(samples, "job_excluded_nodes", **job) == 2
    assert value(samples, "excluded_nodes") == 1
    # The failed job has no goodput, progress or checkpoint: those series are absent, not zero.
    for name in ("job_ettr", "job_step", "job_last_checkpoint_step", "job_progress_timestamp_seconds"):
        assert value(samples, name, training_job=FAILED_JOB) is None, name


def test_terminal_jobs_leave_per_job_series_after_the_retention(metrics_url: str) -> None:
    samples, _ = scrape(metrics_url)
    jobs_seen = {
        dict(labels).get("training_job") for name, labels in samples if name.startswith(PREFIX + "job_")
    }
    assert jobs_seen == {TRAIN_JOB, FAILED_JOB, QUEUED_JOB}
    assert value(samples, "jobs", phase="succeeded") == 1.0  # still counted


def test_restarts_stragglers_and_ranks(metrics_url: str) -> None:
    samples, types = scrape(metrics_url)
    assert types[PREFIX + "restarts"] == "counter"
    restarts = {dict(k)["exit_class"]: v for k, v in series(samples, "restarts_total").items()}
    assert restarts == {"Crash": 2.0, "Hang": 1.0, "StragglerExcluded": 1.0, "Preempted": 1.0}
    assert value(samples, "stragglers_flagged_total", training_job=TRAIN_JOB) == 2.0
    assert value(samples, "slow_nodes_flagged_total", training_job=TRAIN_JOB) == 1.0
    assert value(samples, "job_straggler_ranks", training_job=TRAIN_JOB) == 1.0
    flagged = {dict(k)["rank"]: v for k, v in series(samples, "rank_straggler_flagged").items()}
    assert flagged == {"0": 0.0, "1": 0.0, "2": 0.0, "3": 1.0}
    assert value(samples, "rank_straggler_score", training_job=TRAIN_JOB, rank="3", node="node-b") == 6.2


def test_detection_latency_histogram(metrics_url: str) -> None:
    samples, types = scrape(metrics_url)
    assert types[PREFIX + "failure_detection_seconds"] == "histogram"
    expected = {"ConfigError": [0.3]}
    for exit_class, _, seconds in RESTARTS:
        expected.setdefault(exit_class, []).append(seconds)
    for exit_class, values in expected.items():
        buckets = {
            dict(k)["le"]: v
            for k, v in series(samples, "failure_detection_seconds_bucket").items()
            if dict(k)["exit_class"] == exit_class
        }
        assert buckets == {
            **{floatToGoString(bound): sum(v <= bound for v in values) for bound in DETECTION_BUCKETS},
            "+Inf": len(values),
        }
        assert value(samples, "failure_detection_seconds_count", exit_class=exit_class) == len(values)
        assert value(samples, "failure_detection_seconds_sum", exit_class=exit_class) == pytest.approx(
            sum(values)
        )


def test_every_exposed_family_is_specified(metrics_url: str) -> None:
    samples, types = scrape(metrics_url)
    for name in types:
        if name.startswith("process_"):  # the standard process collector, on purpose
            continue
        spec = METRICS_BY_NAME.get(name) or METRICS_BY_NAME.get(name + "_total")
        assert spec is not None, f"{name} is exposed but not in controller.metrics.METRICS"
        assert spec.kind == types[name]
    for (name, labels), _ in samples.items():
        if name.startswith(PREFIX):
            family = next(s for s in METRICS_BY_NAME.values() if name in (*s.sample_names, s.name))
            assert {k for k, _ in labels} - {"le"} == set(family.labels), name


def test_a_scrape_makes_the_same_few_queries_however_many_jobs(populated: Store) -> None:
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    server, thread = serve_metrics(populated, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    event.listen(populated.engine, "before_cursor_execute", count)
    try:
        scrape(url)
        few = len(statements)
        with populated.transaction() as s:
            for i in range(6):
                create_job(session=s, name=f"more-{i}", spec=_spec(f"more-{i}"))
        statements.clear()
        samples, _ = scrape(url)
        assert value(samples, "jobs", phase="pending") == 7.0
        assert len(statements) == few <= 8
    finally:
        event.remove(populated.engine, "before_cursor_execute", count)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_an_unreadable_store_reports_store_up_zero(empty_db_url: str) -> None:
    store = open_store(StoreConfig(url=empty_db_url))  # never migrated: every table is missing
    server, thread = serve_metrics(store, "127.0.0.1", 0)
    try:
        samples, types = scrape(f"http://127.0.0.1:{server.server_port}/metrics")
        assert value(samples, "store_up") == 0.0
        assert not [name for name in types if name.startswith(PREFIX) and name != PREFIX + "store_up"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        store.dispose()


def test_a_taken_port_is_a_one_line_error(populated: Store) -> None:
    server, thread = serve_metrics(populated, "127.0.0.1", 0)
    try:
        with pytest.raises(
            RuntimeError, match=f"metrics.port: cannot serve metrics on 127.0.0.1:{server.server_port}"
        ):
            serve_metrics(populated, "127.0.0.1", server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_a_large_jobs_rank_series_are_its_flagged_ranks_and_highest_scores() -> None:
    """Per-rank series stay bounded at 16,384 ranks: every rank of a small job; of a large one, the flagged ranks
    (the straggler alert's) and the highest scores (the dashboard's), RANK_SERIES_MAX in all."""
    from controller.metrics import RANK_SERIES_MAX, ranks_with_series
    from controller.views import RankView

    small = [RankView(rank=r, node="n", straggler_score=0.1) for r in range(8)]
    assert ranks_with_series(small) == small
    big = [
        RankView(
            rank=r,
            node=f"node-{r // 8}",
            straggler_score=None if r == 7 else (r % 1000) / 100,
            flagged=r == 3,
        )
        for r in range(16384)
    ]
    shown = ranks_with_series(big)
    assert len(shown) == RANK_SERIES_MAX and [r.rank for r in shown] == sorted(r.rank for r in shown)
    assert 3 in {r.rank for r in shown}  # flagged, though its score is low
    lowest_shown = min(r.straggler_score for r in shown if not r.flagged)
    assert lowest_shown >= max(
        r.straggler_score for r in big if r not in shown and r.straggler_score is not None
    )
