"""Claims and leases: several controllers on one database never launch a job twice; expired leases are taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from controller import states
from controller.domain.phases import Phase
from controller.store import (
    Attempt,
    ClaimNotHeld,
    Event,
    Job,
    Store,
    StoreConfig,
    claim_jobs,
    claim_pending_jobs,
    create_job,
    get_job,
    list_events,
    open_store,
    release_claims,
    renew_leases,
)
from controller.store.migrate import upgrade

REPO_ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

# One controller's claim+launch loop: claim a few pending jobs (one transaction), then launch each in its own
# transaction, which re-checks the claim under the row lock. Runs until no job is pending; prints what it launched.
# A controller whose clock runs ahead sees the others' leases as expired and takes their claims over, sometimes
# between their claim and their launch: the race a stalled controller meets, without depending on timing.
CONTROLLER_LOOP = """
import json, sys, time
from datetime import timedelta
from pathlib import Path
from sqlalchemy import func, select
from controller import states
from controller.domain.phases import Phase
from controller.store import ClaimNotHeld, Job, StoreConfig, claim_pending_jobs, open_store
from controller.store.tables import utcnow

url, controller_id, skew, go = sys.argv[1], sys.argv[2], timedelta(seconds=float(sys.argv[3])), Path(sys.argv[4])
store = open_store(StoreConfig(url=url))
Path(f"{go}.{controller_id}").touch()  # ready
while not go.exists():  # start together, so the controllers really contend
    time.sleep(0.005)
launched, refused = [], 0
while True:
    with store.transaction() as session:
        claimed = [job.id for job in claim_pending_jobs(
            session=session, controller_id=controller_id, lease_seconds=20, limit=2, now=utcnow() + skew)]
    for job_id in claimed:
        try:
            with store.transaction() as session:
                job = session.get_one(Job, job_id)
                states.launch(job, session=session, controller_id=controller_id, nodes=["local-0"], now=utcnow() + skew)
            launched.append(job_id)
        except (ClaimNotHeld, states.InvalidTransition):
            refused += 1
    if not claimed:
        with store.read() as session:
            if not session.scalar(select(func.count()).select_from(Job).where(Job.phase == Phase.PENDING)):
                break
        time.sleep(0.01)
store.dispose()
print(json.dumps({"launched": launched, "refused": refused}))
"""


def _run_controllers(url: str, tmp_path: Path, *, clock_skews: list[float]) -> list[dict]:
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONTROLLER_LOOP, url, f"ctl-{n}", str(skew), str(go)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, skew in enumerate(clock_skews)
    ]
    deadline = time.monotonic() + 60
    while not all(Path(f"{go}.ctl-{n}").exists() for n in range(len(procs))):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
            "a controller did not start"
        )
        time.sleep(0.01)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize(
    "clock_skews", [[0, 0, 0], [0, 30, 60]], ids=["one-clock", "clocks-ahead-steal-leases"]
)
def test_controllers_racing_over_pending_jobs_launch_each_exactly_once(
    migrated_store: Store, empty_db_url: str, tmp_path: Path, clock_skews: list[float]
) -> None:
    num_jobs = 40
    with migrated_store.transaction() as session:
        for i in range(num_jobs):
            create_job(session=session, name=f"job-{i}", spec={})

    results = _run_controllers(empty_db_url, tmp_path, clock_skews=clock_skews)

    launches = Counter(job_id for result in results for job_id in result["launched"])
    assert len(launches) == num_jobs and set(launches.values()) == {1}
    with migrated_store.read() as session:
        phases = Counter(session.scalars(select(Job.phase)))
        attempts_per_job = Counter(session.scalars(select(Attempt.job_id)))
        launched_events = session.scalar(
            select(func.count()).select_from(Event).where(Event.reason == "Launched")
        )
        launchers = dict(session.execute(select(Attempt.job_id, Attempt.launched_by)).all())
    assert phases == {Phase.LAUNCHING: num_jobs}
    assert set(attempts_per_job.values()) == {1} and len(attempts_per_job) == num_jobs
    assert launched_events == num_jobs
    assert launchers == {job_id: f"ctl-{n}" for n, r in enumerate(results) for job_id in r["launched"]}


def test_an_expired_lease_is_taken_over_and_the_old_owner_can_no_longer_launch(migrated_store: Store) -> None:
    with migrated_store.transaction() as session:
        job = create_job(session=session, name="orphan", spec={}, now=T0)
        assert [
            j.name
            for j in claim_pending_jobs(
                session=session, controller_id="ctl-a", lease_seconds=30, limit=5, now=T0
            )
        ] == ["orphan"]

    with migrated_store.transaction() as session:  # within the lease: nobody else gets it, the owner renews
        assert (
            claim_pending_jobs(
                session=session,
                controller_id="ctl-b",
                lease_seconds=30,
                limit=5,
                now=T0 + timedelta(seconds=10),
            )
            == []
        )
        assert renew_leases(
            session=session, controller_id="ctl-a", lease_seconds=30, now=T0 + timedelta(seconds=10)
        ) == {job.id}

    late = T0 + timedelta(seconds=41)  # ctl-a stalled past its renewed lease
    with migrated_store.transaction() as session:
        taken = claim_pending_jobs(
            session=session, controller_id="ctl-b", lease_seconds=30, limit=5, now=late
        )
        assert [(j.name, j.claimed_by) for j in taken] == [("orphan", "ctl-b")]

    with migrated_store.transaction() as session:
        job = get_job(session=session, name="orphan")
        with pytest.raises(ClaimNotHeld, match="held by 'ctl-b'"):
            states.launch(job, session=session, controller_id="ctl-a", nodes=["local-0"], now=late)
        assert renew_leases(session=session, controller_id="ctl-a", lease_seconds=30, now=late) == set()
        states.launch(job, session=session, controller_id="ctl-b", nodes=["local-0"], now=late)

    with migrated_store.read() as session:
        job = get_job(session=session, name="orphan")
        events = list_events(session=session, job_id=job.id)
    assert [(e.reason, e.data and e.data.get("from")) for e in events] == [
        ("Submitted", None),
        ("LeaseTakenOver", "ctl-a"),
        ("Launched", "pending"),
    ]


def test_a_lapsed_lease_must_be_renewed_before_launching(migrated_store: Store) -> None:
    with migrated_store.transaction() as session:
        job = create_job(session=session, name="slow", spec={}, now=T0)
        claim_pending_jobs(session=session, controller_id="ctl-a", lease_seconds=30, limit=1, now=T0)
        with pytest.raises(ClaimNotHeld):
            states.launch(
                job, session=session, controller_id="ctl-a", nodes=["n"], now=T0 + timedelta(seconds=31)
            )
        renew_leases(session=session, controller_id="ctl-a", lease_seconds=30, now=T0 + timedelta(seconds=31))
        states.launch(
            job, session=session, controller_id="ctl-a", nodes=["n"], now=T0 + timedelta(seconds=31)
        )


def test_running_jobs_of_a_dead_controller_are_taken_over_not_relaunched(migrated_store: Store) -> None:
    with migrated_store.transaction() as session:
        job = create_job(session=session, name="healthy", spec={}, now=T0)
        claim_jobs(session=session, controller_id="ctl-a", lease_seconds=30, limit=5, now=T0)
        states.launch(job, session=session, controller_id="ctl-a", nodes=["local-0"], now=T0)
        states.mark_running(job, session=session, controller_id="ctl-a", now=T0)

    later = T0 + timedelta(minutes=5)
    with migrated_store.transaction() as session:
        assert (
            claim_pending_jobs(session=session, controller_id="ctl-b", lease_seconds=30, limit=5, now=later)
            == []
        )
        taken = claim_jobs(session=session, controller_id="ctl-b", lease_seconds=30, limit=5, now=later)
        assert [(j.name, j.phase, j.current_attempt) for j in taken] == [("healthy", Phase.RUNNING, 1)]
        assert release_claims(session=session, controller_id="ctl-b") == 1
        assert get_job(session=session, name="healthy").claimed_by is None


def test_skip_locked_hands_concurrent_claimers_disjoint_jobs_without_waiting(postgres_only_url: str) -> None:
    stores = [open_store(StoreConfig(url=postgres_only_url)) for _ in range(2)]
    try:
        upgrade(stores[0])
        with stores[0].transaction() as session:
            for i in range(6):
                create_job(session=session, name=f"job-{i}", spec={})
        # The first claim stays uncommitted, holding its row locks, while the second claims.
        with stores[0].transaction() as first, stores[1].transaction() as second:
            mine = {
                j.name
                for j in claim_pending_jobs(session=first, controller_id="ctl-a", lease_seconds=30, limit=4)
            }
            theirs = {
                j.name
                for j in claim_pending_jobs(session=second, controller_id="ctl-b", lease_seconds=30, limit=4)
            }
        assert mine == {f"job-{i}" for i in range(4)} and theirs == {"job-4", "job-5"}
    finally:
        for store in stores:
            store.dispose()
