"""The reconcile loop: every pass, make each job this controller holds match what its phase says.

    pending / restarting (backoff over)  -> pick nodes and a verified checkpoint, launch the next attempt
    launching / running                  -> read exits and telemetry: success, failure, hang, stragglers,
                                            checkpoints, progress, goodput
    succeeded / failed / cancelled       -> make sure no process of the job is left

Decisions:

- Level-triggered: a pass reads the phase and the world (exit codes, telemetry, checkpoint folders) and acts on
  what it sees, never on a remembered edge. Every action is idempotent or guarded by the state machine, so a
  pass that runs twice, or a controller killed between two writes, converges to the same result.
- Crash safety. A launch commits the attempt (launching) before starting processes and records the gang right
  after: a controller killed in between leaves an attempt without a record, which the next controller treats
  as an interrupted launch (reap whatever was started, relaunch, not counted as a failure). A controller
  restarted with the same id picks its claims up at once (`renew_leases`); another controller takes them over
  when the lease runs out. Either re-attaches to the running gang from the attempt's backend record and
  re-reads the ranks' telemetry: healthy ranks are never relaunched, events are never lost (they are written in
  the same transaction as the phase change they explain).
- A gang whose node failed is stopped at once (torchrun nodes that finished would wait at their exit barrier),
  then classified with the failure rules; the restart policy decides (backoff, crash loop, limit).
- Hangs: no progress for the hang threshold -> every rank's Python stacks into the job's logs, then stop the
  gang and handle it as a failure of class Hang.
- Stragglers: `report` writes an event per newly flagged rank and a node event when a node is slow; with
  `exclude-node`, the node is excluded and the gang restarted (SIGTERM first, so the trainer saves a
  checkpoint at its current step) only when `policy.decide_exclusion` says the time saved beats the
  measured restart cost (and the job can do without the node); the decision and its numbers are an event
  either way.
- Decisions are pure functions of values (`controller.policy`, `hangs`, `failures`): this loop gathers their
  inputs from the store, the backend and the telemetry, calls them, and applies the answer.
- One job's error never stops the loop: it is logged and the job is retried on the next pass.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import states
from controller.backends.base import EXIT_LOST, Backend, GangHandle
from controller.backends.rank_exec import ENV_MEMORY_LIMIT
from controller.checkpoints import (
    NoSuchCheckpoint,
    ResumePoint,
    checkpoint_root,
    choose_resume_point,
    sync_checkpoints,
)
from controller.domain.phases import SUPERVISED_PHASES, TERMINAL_PHASES, EventType, Phase, SupervisionReason
from controller.failures import AttemptEnd, Classification, ExitClass, RankExit, classify
from controller.hangs import PHASE_TRAINING, HangVerdict, hang_culprits, hang_failed_at
from controller.history import (
    checkpoint_interval,
    failure_history,
    record_failure,
    restart_cost,
    update_goodput,
)
from controller.inplace import (
    CoordinatorClient,
    CoordinatorError,
    InPlace,
    adopted_replacement,
    hung_node,
    in_place_crash_loop,
    plan_replacement,
    recovery_times,
    spare_wait_seconds,
    starting_spares,
    steps_done,
    unfinished_recovery,
)
from controller.memory import rank_memory_limit
from controller.policy import ExclusionCase, decide_exclusion, decide_restart
from controller.spec import TrainingJobSpec
from controller.store.claims import claim_jobs, release_claims, renew_leases
from controller.store.models import Event, Job
from controller.store.records import exclude_node, excluded_nodes, prune_rank_windows, record_rank_windows
from controller.store.repo import append_event, get_current_attempt
from controller.store.session import Store
from controller.stragglers import StragglerReport
from controller.supervision import KEEP_WINDOWS, LiveAttempt

log = logging.getLogger(__name__)

STOPPED_BY_CONTROLLER = "stopped_by_controller"  # in an attempt's backend record


def default_controller_id() -> str:
    """Stable per host, so a restarted controller holds its claims again at once."""
    return f"ctl-{socket.gethostname()}"[:128]


def default_runs_root() -> Path:
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "vlctl" / "runs"


@dataclass(kw_only=True)
class ControllerConfig:
    controller_id: str = field(default_factory=default_controller_id)
    poll_seconds: float = 1.0
    lease_seconds: float = 30.0
    max_jobs: int = 64  # jobs one controller manages at once
    runs_root: Path = field(default_factory=default_runs_root)  # run folders of jobs with a relative run_dir
    cancel_grace_seconds: float = 15.0  # SIGTERM -> SIGKILL
    checkpoint_scan_seconds: float = 2.0

    def __post_init__(self) -> None:
        for name in ("poll_seconds", "lease_seconds", "checkpoint_scan_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.lease_seconds <= self.poll_seconds:  # each pass renews it
            raise ValueError(
                f"lease_seconds: must be more than poll_seconds ({self.poll_seconds:g}), got {self.lease_seconds:g}"
            )
        if self.max_jobs < 1:
            raise ValueError(f"max_jobs: must be >= 1, got {self.max_jobs}")
        if self.cancel_grace_seconds < 0:
            raise ValueError(f"cancel_grace_seconds: must be >= 0, got {self.cancel_grace_seconds}")
        self.runs_root = Path(self.runs_root)


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _ts(d: datetime | None) -> float | None:
    return None if d is None else d.timestamp()


def job_run_dir(spec: TrainingJobSpec, runs_root: Path) -> Path:
    """The job's run folder: `training.run_dir` when absolute, else `runs_root/<job name>`."""
    run_dir = Path(spec.training.run_dir)
    return run_dir if run_dir.is_absolute() else Path(runs_root) / spec.name


class Controller:
    def __init__(
        self,
        store: Store,
        *,
        backends: Mapping[str, Backend],
        config: ControllerConfig | None = None,
        clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
        env: Mapping[str, str] | None = None,
    ):
        self.store = store
        self.backends = dict(backends)
        self.config = config or ControllerConfig()
        self.clock = clock
        self.draw = draw  # the backoff's random draw
        self.env = dict(env or {})  # extra environment for every rank (tests inject faults through it)
        self._live: dict[int, LiveAttempt] = {}
        self._last_scan: dict[int, float] = {}

    @property
    def id(self) -> str:
        return self.config.controller_id

    # ------------------------------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event, *, on_pass: Callable[[], None] | None = None) -> None:
        """Reconcile until `stop` is set. The caller then calls `shutdown` (detach, or stop the jobs)."""
        while not stop.is_set():
            started = self.clock()
            self.reconcile_once()
            if on_pass is not None:
                on_pass()
            stop.wait(max(0.0, self.config.poll_seconds - (self.clock() - started)))

    def shutdown(self, *, stop_jobs: bool = False) -> None:
        """Leave, releasing this controller's claims so the next controller takes the jobs at once.

        `stop_jobs=False`: detach, the gangs keep training and the next controller re-attaches to them.
        `stop_jobs=True`: SIGTERM every gang (the trainer finishes its step and saves a checkpoint, exit 75), so
        no process outlives the controller; the next controller sees a preempted attempt and resumes it from
        that checkpoint, without counting it as a failure.
        """
        with self.store.transaction() as session:
            for live in self._live.values():
                if stop_jobs:
                    # Recorded first: the next controller classifies the attempt's end as a preemption.
                    self._mark_stopped(session, live)
            release_claims(session=session, controller_id=self.id)
        for live in self._live.values():
            if stop_jobs:
                live.gang.cancel(self.config.cancel_grace_seconds)
            else:
                live.gang.detach()
        self._live.clear()

    def _still_ours(self, session: Session, job_id: int) -> bool:
        """Before writing what slow I/O found (a launch against a slow API server, a teardown's grace period), renew
        the claims and say whether `job_id` is still this controller's: a lease that lapsed meanwhile is, unless
        another controller took the job; then nothing of ours may be written on it."""
        held = renew_leases(
            session=session,
            controller_id=self.id,
            lease_seconds=self.config.lease_seconds,
            now=_dt(self.clock()),
        )
        if job_id not in held:
            log.warning(
                "job %d: another controller took it over while this one waited on the backend", job_id
            )
        return job_id in held

    def _mark_stopped(self, session: Session, live: LiveAttempt) -> None:
        job = session.get(Job, live.job_id)
        attempt = get_current_attempt(session=session, job=job) if job is not None else None
        if attempt is None or attempt.number != live.attempt or attempt.backend_record is None:
            return
        attempt.backend_record = {**attempt.backend_record, STOPPED_BY_CONTROLLER: True}
        append_event(
            session=session,
            now=_dt(self.clock()),
            job=job,
            type=EventType.CONTROLLER,
            reason=SupervisionReason.RANKS_STOPPED,
            message=f"controller {self.id} is exiting: stopping the ranks (they save a checkpoint first)",
            attempt=live.attempt,
        )

    def reconcile_once(self) -> None:
        now = self.clock()
        with self.store.transaction() as session:
            held = renew_leases(
                session=session, controller_id=self.id, lease_seconds=self.config.lease_seconds, now=_dt(now)
            )
            room = self.config.max_jobs - len(held)
            if room > 0:
                claimed = claim_jobs(
                    session=session,
                    controller_id=self.id,
                    lease_seconds=self.config.lease_seconds,
                    limit=room,
                    backends=sorted(self.backends),
                    now=_dt(now),
                )
                held |= {job.id for job in claimed}
        for job_id in [j for j in self._live if j not in held]:
            self._let_go(job_id)
        for job_id in sorted(held):
            try:
                self._reconcile(job_id)
            except Exception:
                log.exception("job %d: reconcile failed; retrying on the next pass", job_id)

    def _let_go(self, job_id: int) -> None:
        """The job left this controller: ended (stop its processes) or taken over (leave them to the new owner)."""
        live = self._live.pop(job_id)
        with self.store.read() as session:
            job = session.get(Job, job_id)
            phase = job.phase if job is not None else Phase.CANCELLED
        if phase in TERMINAL_PHASES:
            live.gang.cancel(self.config.cancel_grace_seconds)
        else:
            live.gang.detach()

    def _reconcile(self, job_id: int) -> None:
        with self.store.read() as session:
            job = session.get(Job, job_id)
            if job is None:
                return
            phase, next_at = job.phase, job.next_attempt_at
            spec = TrainingJobSpec.model_validate(job.spec)
        if phase is Phase.PENDING or (
            phase is Phase.RESTARTING and (next_at is None or next_at.timestamp() <= self.clock())
        ):
            self._launch(job_id, spec)
        elif phase in SUPERVISED_PHASES:
            self._supervise(job_id, spec)

    # ---------------------------------------------------------------------------------------- launching

    def _backend(self, spec: TrainingJobSpec) -> Backend:
        backend = self.backends.get(spec.backend)
        if backend is None:
            raise RuntimeError(f"backend: this controller has no {spec.backend!r} backend")
        return backend

    def _launch(self, job_id: int, spec: TrainingJobSpec) -> None:
        backend = self._backend(spec)
        now = self.clock()
        run_dir = job_run_dir(spec, self.config.runs_root)
        root = checkpoint_root(spec.training, run_dir)
        reaped = backend.reap(spec.name)
        with self.store.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if reaped:
                append_event(
                    session=session,
                    now=_dt(self.clock()),
                    job=job,
                    type=EventType.CONTROLLER,
                    reason=SupervisionReason.REAPED,
                    message=f"stopped {reaped} process(es) of a launch no controller recorded",
                )
            nodes = self._pick_nodes(session, job, spec, backend)
            if nodes is None:
                return
            try:
                resume = choose_resume_point(
                    session=session, job=job, root=root, from_step=job.resume_from_step
                )
            except NoSuchCheckpoint as err:
                states.fail(
                    job,
                    session=session,
                    message=str(err),
                    reason=SupervisionReason.LAUNCH_FAILED,
                    now=_dt(now),
                )
                return
            interval = checkpoint_interval(session=session, job=job, spec=spec, now=self.clock())
            excluded = sorted(excluded_nodes(session=session, job_id=job.id))
            attempt = states.launch(
                job,
                session=session,
                controller_id=self.id,
                nodes=nodes,
                resume_from_step=resume.step if resume else None,
                resume_from_uri=resume.uri if resume else None,
                now=_dt(now),
            )
            job.resume_from_step = None
            job.next_attempt_at = None
            job.total_steps = spec.training.training.steps
            job.run_dir = str(run_dir)
            number = attempt.number
        config_path = self._write_config(spec, run_dir, number, interval=interval, resume=resume)
        overrides: list[str] = []
        try:
            gang = backend.launch(
                job_name=spec.name,
                attempt=number,
                config_path=config_path,
                overrides=overrides,
                nodes=len(nodes),
                procs_per_node=spec.resources.procs_per_node,
                run_dir=run_dir,
                env=self._rank_env(spec),
                names=nodes,
                excluded=excluded,
                hot_spares=(
                    spec.fault_tolerance.hot_spares if spec.fault_tolerance.recovery == "in-place" else None
                ),
            )
        except Exception as err:
            log.exception("job %s: launch of attempt %d failed", spec.name, number)
            with self.store.transaction() as session:
                if not self._still_ours(session, job_id):
                    return
                job = session.get(Job, job_id)
                assert job is not None
                self._end_attempt(
                    session,
                    job,
                    spec,
                    Classification(
                        exit_class=ExitClass.UNKNOWN,
                        message=f"launch failed: {type(err).__name__}: {err}",
                        retryable=True,
                        counts_toward_limit=True,
                        step=None,
                    ),
                    now=self.clock(),
                    live=None,
                )
            return
        with self.store.transaction() as session:
            taken = not self._still_ours(session, job_id)
            if not taken:
                job = session.get(Job, job_id)
                assert job is not None
                row = get_current_attempt(session=session, job=job)
                assert row is not None and row.number == number
                row.backend_record = gang.record()
        if taken:
            # The new owner launches its own gang for this job: ours must not run beside it.
            gang.cancel(self.config.cancel_grace_seconds)
            return
        self._live[job_id] = self._watch(job_id, spec, gang, number, run_dir, launched_at=now, nodes=nodes)

    def _rank_env(self, spec: TrainingJobSpec) -> dict[str, str]:
        limit = rank_memory_limit(spec)
        return {**self.env, **({ENV_MEMORY_LIMIT: str(limit)} if limit is not None else {})}

    def _watch(
        self,
        job_id: int,
        spec: TrainingJobSpec,
        gang: GangHandle,
        attempt: int,
        run_dir: Path,
        *,
        launched_at: float,
        nodes: list[str],
        reattach: bool = False,
    ) -> LiveAttempt:
        per_node = spec.resources.procs_per_node
        rank_nodes = [nodes[r // per_node] for r in range(spec.resources.world_size)]
        return LiveAttempt(
            job_id=job_id,
            job_name=spec.name,
            attempt=attempt,
            num_ranks=spec.resources.world_size,
            dp=spec.training.parallel.dp,
            gang=gang,
            telemetry=self._backend(spec).telemetry(
                job_name=spec.name,
                run_dir=run_dir,
                num_ranks=spec.resources.world_size,
                attempt=attempt,
                rank_nodes=rank_nodes,
                reattach=reattach,
            ),
            launched_at=launched_at,
            stragglers=spec.straggler_config(),
            hang=spec.hang_config(),
            total_steps=spec.training.training.steps,
        )

    def _pick_nodes(
        self, session: Session, job: Job, spec: TrainingJobSpec, backend: Backend
    ) -> list[str] | None:
        """Nodes for the next attempt, avoiding excluded ones (spares take their place)."""
        want, spares = spec.resources.nodes, spec.resources.spare_nodes
        excluded = excluded_nodes(session=session, job_id=job.id)
        nodes = backend.node_slots(nodes=want, spares=spares, excluded=excluded)
        if nodes is None:
            states.fail(
                job,
                session=session,
                message=(
                    f"needs {want} node(s) of {want + spares}, but {', '.join(sorted(excluded))} are excluded"
                ),
                reason="NotEnoughNodes",
                now=_dt(self.clock()),
            )
        return nodes

    def _write_config(
        self, spec: TrainingJobSpec, run_dir: Path, attempt: int, *, interval: int, resume: ResumePoint | None
    ) -> Path:
        """The attempt's training config: the spec's, with the run folder, the job label, the checkpoint interval
        in effect and the checkpoint to resume from made explicit (the trainer loads exactly that one)."""
        config = spec.training.model_copy(deep=True)
        config.run_dir = str(run_dir)
        config.job_name = spec.name
        config.checkpoint.interval_steps = interval
        if resume is None:
            config.checkpoint.resume = "none"
            config.checkpoint.resume_step = None
        else:
            config.checkpoint.resume = "latest"
            config.checkpoint.resume_step = resume.step
        path = run_dir / "vlctl" / f"attempt-{attempt}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(config.model_dump(mode="json"), indent=1))
        tmp.replace(path)
        return path

    # -------------------------------------------------------------------------------------- supervising

    def _supervise(self, job_id: int, spec: TrainingJobSpec) -> None:
        live = self._live.get(job_id)
        if live is None:
            live = self._reattach(job_id, spec)
            if live is None:
                return
            self._live[job_id] = live
        now = self.clock()
        codes = live.gang.poll()
        update = live.telemetry.poll(now)
        newly_flagged, windows = live.absorb(update)
        failed_nodes = {n: c for n, c in codes.items() if c is not None and c != 0}
        lost: dict[str, int | None] = dict(failed_nodes)
        if spec.fault_tolerance.recovery == "in-place" and (
            early := getattr(live.gang, "lost_workers", None)
        ):
            for node in early():  # a rank process gone, its torchrun not yet: decided without waiting for it
                lost.setdefault(node, None)
        if live.coordinator_exit is None and (ended := getattr(live.gang, "coordinator_exit", None)):
            self._notice_coordinator(job_id, live, ended())
        if live.recoveries:  # first: a recovery that finished is not taken for one a new failure supersedes
            self._follow_in_place(job_id, live, now)
        outcome = self._recover_in_place(job_id, spec, live, lost, now) if lost else InPlace.DECLINED
        if outcome is InPlace.RECOVERING:
            codes = live.gang.poll()  # the spare stands in the lost node's place now
            failed_nodes = {n: c for n, c in codes.items() if c is not None and c != 0}
        elif outcome is InPlace.AWAITING_SPARE:
            failed_nodes = {}  # the survivors wait in place for the spare: no restart, no hang verdict
        live.awaiting_spare = {n: t for n, t in live.awaiting_spare.items() if n in lost}
        self._replenish_spares(job_id, spec, live)
        with self.store.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if job.phase not in SUPERVISED_PHASES or job.current_attempt != live.attempt:
                return  # changed under us (cancelled); the next pass lets go
            self._record_progress(session, job, live, now)
            self._scan_checkpoints(session, job, spec, live, now)
            for report in newly_flagged:
                self._report_straggler(session, job, report)
            for window in windows:
                record_rank_windows(
                    session=session,
                    job_id=job_id,
                    attempt=live.attempt,
                    windows=live.window_records(window),
                    now=_dt(self.clock()),
                )
                prune_rank_windows(session=session, job_id=job_id, keep_windows=KEEP_WINDOWS)
                # A node is reported when it becomes slow, as a rank is when it is flagged: one event per
                # episode, not one per window (a node of one rank filled the timeline every window).
                newly_slow = [node for node in window.nodes if node.node not in live.slow_nodes]
                live.slow_nodes = {node.node for node in window.nodes}
                for node in newly_slow:
                    append_event(
                        session=session,
                        now=_dt(self.clock()),
                        job=job,
                        type=EventType.STRAGGLER,
                        reason=SupervisionReason.NODE_SLOW,
                        message=(
                            f"node {node.node} is slow: {len(node.ranks)} of {node.num_ranks} ranks flagged, "
                            f"{node.slowdown:.2f}x, {node.cause or 'unknown'} ({node.phase or 'no phase'})"
                        ),
                        data={
                            "node": node.node,
                            "ranks": list(node.ranks),
                            "slowdown": node.slowdown,
                            "phase": node.phase,
                            "cause": node.cause,
                            "step": window.last_step,
                        },
                        attempt=live.attempt,
                    )
            if job.phase is Phase.LAUNCHING and live.progress.step is not None:
                states.mark_running(
                    job,
                    session=session,
                    controller_id=self.id,
                    message=f"first step {live.progress.step} done",
                    now=_dt(now),
                )
            update_goodput(session=session, job=job, now=now)
        ended = bool(codes) and all(c == 0 for c in codes.values())
        if failed_nodes or ended:
            self._handle_end(job_id, spec, live, codes=codes, now=now)
        else:
            verdict = live.check_hang(now)
            if verdict.hung and (live.recoveries or live.awaiting_spare or now < live.hang_quiet_until):
                pass  # an in-place recovery is under way: the ranks wait for it, they are not hung
            elif verdict.hung and not self._kill_hung_in_place(job_id, spec, live, verdict, now):
                self._handle_hang(job_id, spec, live, verdict, now)
            elif windows and spec.stragglers.action == "exclude-node" and live.flagged:
                self._consider_exclusion(job_id, spec, live, now)

    # ------------------------------------------------------------------------------- in-place recovery

    def _recover_in_place(
        self,
        job_id: int,
        spec: TrainingJobSpec,
        live: LiveAttempt,
        failed: Mapping[str, int | None],
        now: float,
    ) -> InPlace:
        """A node failed under `recovery: in-place`: give its ranks to a waiting spare node (see
        controller/inplace.py), wait for one still starting, or decline (the restart path handles the failure).
        `failed`: node -> its exit code, None for a node whose rank process is gone while its torchrun still
        runs."""
        gang = live.gang
        url = getattr(gang, "coordinator_url", None)
        if spec.fault_tolerance.recovery != "in-place" or url is None:
            return InPlace.DECLINED
        client = CoordinatorClient(url)
        nodes = list(gang.poll())
        final = any(c is not None for c in failed.values())  # a node still ending is decided on next pass
        if live.coordinator_exit is not None:
            if final:
                self._decline_in_place(
                    job_id,
                    live,
                    f"the recovery coordinator ended (exit code {live.coordinator_exit})",
                    failed,
                )
            return InPlace.DECLINED
        step = live.progress.step
        limit = spec.restart_policy().crash_loop_limit
        if in_place_crash_loop(live.in_place_failure_steps, step, limit=limit):
            # The crash-loop guard, in place: a failure that recovery keeps bringing back at the same step goes
            # to the restart path, whose own guard counts it (a deterministic crash would otherwise churn spares).
            if final:
                self._decline_in_place(
                    job_id,
                    live,
                    f"the job failed at step {step} for the {limit}th time in this attempt (a crash that in-place "
                    "recovery brings back)",
                    failed,
                )
            return InPlace.DECLINED
        try:
            status = client.status()
            adopted = adopted_replacement(
                status,
                failed=sorted(failed),
                nodes=nodes,
                procs_per_node=spec.resources.procs_per_node,
                spares=gang.live_spares(),
                known_rounds=[p["round"] for p in live.recoveries],
            )
            if adopted is not None:
                plan, opened = adopted
                decided_at = float(opened["opened_at"])
            else:
                plan = plan_replacement(
                    failed=sorted(failed),
                    nodes=nodes,
                    procs_per_node=spec.resources.procs_per_node,
                    live_spares=gang.live_spares(),
                    waiting=status["spares_waiting"],
                )
                if plan is None and self._await_spare(
                    job_id,
                    live,
                    failed,
                    status,
                    now,
                    procs_per_node=spec.resources.procs_per_node,
                    final=final,
                ):
                    return InPlace.AWAITING_SPARE
                if plan is None:
                    if final:
                        why = (
                            f"nodes {', '.join(sorted(failed))} were lost together (a rank's snapshot may be "
                            "lost with the peer that keeps its replica)"
                            if len(failed) > 1
                            else f"no spare node was ready for {', '.join(failed)} within "
                            f"{self._spare_wait(live):.0f} s"
                            if set(failed) & set(live.awaiting_spare)
                            else f"no spare node is ready for {', '.join(failed)} and none could be started"
                        )
                        self._decline_in_place(job_id, live, why, failed)
                    return InPlace.DECLINED
                opened = client.replace(plan.ranks, failed_round=int(status["round"]), members=plan.members)
                decided_at = now
        except CoordinatorError as err:
            if final:
                self._decline_in_place(
                    job_id, live, f"the recovery coordinator is unavailable ({err})", failed
                )
            return InPlace.DECLINED
        code = failed[plan.node]
        # A node seen failed through its rank process has no end time yet: it was seen this pass.
        died_at = gang.node_end_time(plan.node) if code is not None else now
        # Killed for a hang: lost since it stalled.
        if (hung := live.hung_since.pop(plan.node, None)) is not None:
            died_at = hung if died_at is None else min(died_at, hung)
        # A recovery still pending whose newcomer was lost before it resumed (or any older round, now
        # superseded): its ranks moved on to this round, which counts the outage from the first failure.
        superseded = [p for p in live.recoveries if p["round"] < int(opened["round"])]
        rounds = {int(r["round"]): r for r in status.get("rounds", [])}
        done_before = None
        for pending in superseded:
            live.recoveries.remove(pending)
            if pending["died_at"] is not None:
                died_at = pending["died_at"] if died_at is None else min(died_at, pending["died_at"])
            for done in (pending.get("done_before"), steps_done(rounds.get(pending["round"], {}))):
                if done is not None:
                    done_before = done if done_before is None else max(done_before, done)
        gang.promote(plan.spare, replacing=plan.node)
        per_node = spec.resources.procs_per_node
        live.reassign([name for name in gang.poll() for _ in range(per_node)])  # reports name the spare now
        live.recoveries.append(
            {
                "round": int(opened["round"]),
                "node": plan.node,
                "spare": plan.spare,
                "ranks": list(plan.ranks),
                "died_at": died_at,
                "decided_at": decided_at,
                "done_before": done_before,
                "at_step": step,
            }
        )
        lost = "a rank process ended" if code is None else f"exit code {code}"
        self._recovery_event(
            job_id,
            live,
            SupervisionReason.IN_PLACE_STARTED,
            f"node {plan.node} lost ({lost}): its rank(s) {', '.join(map(str, plan.ranks))} go to spare "
            f"{plan.spare} in round {opened['round']}; the other nodes keep running"
            + (" (decided before this controller started: finished here)" if adopted is not None else "")
            + (
                f"; round(s) {', '.join(str(p['round']) for p in superseded)} superseded before resuming"
                if superseded
                else ""
            ),
            {
                "node": plan.node,
                "exit_code": code,
                "spare": plan.spare,
                "ranks": list(plan.ranks),
                "round": opened["round"],
                "died_at": died_at,
                "decided_at": decided_at,
                "adopted": adopted is not None,
                "superseded": [p["round"] for p in superseded],
            },
        )
        return InPlace.RECOVERING

    def _notice_coordinator(self, job_id: int, live: LiveAttempt, code: int | None) -> None:
        """The recovery coordinator ended while the ranks train: said once. They train on (they need its store
        only to re-form their groups), and the next failure takes the restart path."""
        if code is None:
            return
        live.coordinator_exit = code
        self._recovery_event(
            job_id,
            live,
            SupervisionReason.COORDINATOR_LOST,
            f"the recovery coordinator ended (exit code {code}): the ranks train on without in-place recovery; "
            "a failure in this attempt restarts the job from its newest disk checkpoint",
            {"exit_code": code},
        )

    def _await_spare(
        self,
        job_id: int,
        live: LiveAttempt,
        failed: Mapping[str, int | None],
        status: Mapping[str, Any],
        now: float,
        *,
        procs_per_node: int,
        final: bool,
    ) -> bool:
        """No spare node waits for the one lost node: whether its ranks wait in place for one still starting
        (up to `spare_wait_seconds`). With no spare at all, only the lost node is started again, as a spare that
        takes its ranks once it waits."""
        if len(failed) != 1:
            return False
        (node,) = failed
        gang = live.gang
        starting = starting_spares(
            live_spares=gang.live_spares(), waiting=status["spares_waiting"], procs_per_node=procs_per_node
        )
        if not starting and final and node not in live.awaiting_spare:
            started = gang.start_spare()
            if started is not None:
                starting = [started]
                self._recovery_event(
                    job_id,
                    live,
                    SupervisionReason.SPARE_STARTED,
                    f"spare {started} starting to replace node {node} (no spare was waiting); the other nodes "
                    "wait in place",
                    {"spare": started, "replacing": node},
                )
        if not starting:
            return False
        since = live.awaiting_spare.setdefault(node, now)
        return now - since < self._spare_wait(live)

    @staticmethod
    def _spare_wait(live: LiveAttempt) -> float:
        return spare_wait_seconds(
            launched_at=live.launched_at,
            first_step_at=live.progress.first_step_at,
            limit=live.hang.startup_timeout_seconds,
        )

    def _decline_in_place(
        self, job_id: int, live: LiveAttempt, why: str, failed: Mapping[str, int | None]
    ) -> None:
        """The restart path takes this failure: said once, with why, before its Failure event."""
        log.warning("job %s: in-place recovery not possible: %s; restarting", live.job_name, why)
        self._recovery_event(
            job_id,
            live,
            SupervisionReason.IN_PLACE_DECLINED,
            f"in-place recovery not possible: {why}; the attempt restarts from the newest disk checkpoint",
            {"nodes": sorted(failed), "why": why},
        )

    def _kill_hung_in_place(
        self, job_id: int, spec: TrainingJobSpec, live: LiveAttempt, verdict: HangVerdict, now: float
    ) -> bool:
        """A hang under `recovery: in-place` whose first-stalled ranks are all on one node: that node's rank
        processes are killed (after their stacks are dumped), so that the next pass replaces the node in place
        like any lost one, and the other ranks keep their processes. False: the restart path handles the hang."""
        gang = live.gang
        kill = getattr(gang, "kill_ranks", None)
        # Only while training: before the first step no snapshot exists to go back to, and after the last one
        # the gang is saving and exiting.
        if spec.fault_tolerance.recovery != "in-place" or kill is None or verdict.phase != PHASE_TRAINING:
            return False
        texts: dict[int, str] = {}
        pids = gang.rank_pids()  # one look for the stacks, the stopped check and the kill
        stacks = gang.dump_stacks(texts, pids)
        culprits = hang_culprits(verdict.first_stalled, stacks=texts, stopped=gang.stopped_ranks(pids))
        nodes = list(gang.poll())
        node = hung_node(culprits, nodes=nodes, procs_per_node=spec.resources.procs_per_node)
        if node is None:
            return False  # the restart path dumps the stacks again: a second look, minutes apart, is cheap
        first = nodes.index(node) * spec.resources.procs_per_node
        ranks = list(range(first, first + spec.resources.procs_per_node))
        killed = kill(ranks, pids)
        # Processes out of the controller's sight (pods): the node's pod was deleted.
        how = (
            f"pids {', '.join(map(str, killed))}"
            if killed
            else "no process found"
            if pids
            else "its pod deleted"
        )
        # The survivors make no progress until the replacement is in: no second verdict before then.
        live.hang_quiet_until = now + verdict.threshold_seconds
        live.hung_since[node] = hang_failed_at(verdict)  # the recovery's outage starts there, not at the kill
        self._recovery_event(
            job_id,
            live,
            SupervisionReason.HUNG_RANKS_KILLED,
            f"{verdict.message}; node {node}'s rank(s) {', '.join(map(str, ranks))} stopped first: killed "
            f"({how}) to be replaced in place; Python stacks of {len(stacks)} rank(s) written to the job's logs",
            {
                "node": node,
                "ranks": ranks,
                "pids": killed,
                "first_stalled": list(verdict.first_stalled),
                "culprits": list(culprits),
            },
        )
        return True

    def _replenish_spares(self, job_id: int, spec: TrainingJobSpec, live: LiveAttempt) -> None:
        """Keep `hot_spares` spares. One lost while waiting is replaced at once. The one that replaces a promoted
        spare starts once the job has completed a step after its recovery: a spare's start-up (the interpreter,
        torch, the model) takes CPU and memory from the ranks, and started at once it slowed the very steps the
        recovery was resuming."""
        gang = live.gang
        for name, code in getattr(gang, "lost_spares", lambda: [])():
            started = None
            if len(gang.live_spares()) < spec.fault_tolerance.hot_spares:
                started = gang.start_spare()
            self._recovery_event(
                job_id,
                live,
                SupervisionReason.SPARE_LOST,
                f"spare {name} ended while waiting (exit code {code}): "
                + (
                    f"spare {started} starting in its place"
                    if started
                    else "not replaced (this gang cannot start spares: its record predates what that needs)"
                    if not getattr(gang, "can_start_spares", False)
                    else "not replaced (the job has its spares)"
                ),
                {"spare": name, "exit_code": code, "replacement": started},
            )
        due = live.spare_due_after
        if due is None or (live.progress.last_progress_at or 0.0) <= due:
            return
        live.spare_due_after = None
        if len(gang.live_spares()) >= spec.fault_tolerance.hot_spares:
            return
        started = gang.start_spare()
        if started:
            self._recovery_event(
                job_id,
                live,
                SupervisionReason.SPARE_STARTED,
                f"spare {started} starting (the job has trained a step since its recovery)",
                {"spare": started},
            )

    def _follow_in_place(self, job_id: int, live: LiveAttempt, now: float) -> None:
        """Each pending recovery whose ranks all resumed gets its event: the phases and the steps lost."""
        url = getattr(live.gang, "coordinator_url", None)
        if url is None:
            return
        try:
            rounds = {r["round"]: r for r in CoordinatorClient(url).status()["rounds"]}
        except CoordinatorError as err:
            log.warning("job %s: coordinator status unavailable: %s", live.job_name, err)
            return
        for pending in list(live.recoveries):
            times = recovery_times(
                rounds.get(pending["round"], {}),
                died_at=pending["died_at"],
                decided_at=pending["decided_at"],
                done_before=pending.get("done_before"),
            )
            if times is None:
                continue
            live.recoveries.remove(pending)
            if pending.get("at_step") is not None:
                live.in_place_failure_steps.append(int(pending["at_step"]))
            live.spare_due_after = max(live.spare_due_after or 0.0, times.resumed_at)
            # The ranks' last progress is from before the failure: their first step back is due, not late.
            live.hang_quiet_until = max(live.hang_quiet_until, now + live.hang.hang_timeout_seconds)
            lost = times.steps_lost
            self._recovery_event(
                job_id,
                live,
                SupervisionReason.RECOVERED_IN_PLACE,
                f"recovered in place from memory at step {times.step}: "
                + (f"detect {times.detect_s:.2f} s, " if times.detect_s is not None else "")
                + f"regroup {times.regroup_s:.2f} s, restore {times.restore_s:.2f} s"
                + (f"; {lost} completed step(s) done again" if lost is not None else ""),
                {
                    "round": pending["round"],
                    "node": pending["node"],
                    "spare": pending["spare"],
                    "step": times.step,
                    "detect_seconds": times.detect_s,
                    "regroup_seconds": times.regroup_s,
                    "restore_seconds": times.restore_s,
                    "steps_lost": lost,
                    "resumed_at": times.resumed_at,
                    "died_at": pending["died_at"]
                    if pending["died_at"] is not None
                    else pending["decided_at"],
                },
            )

    def _recovery_event(
        self, job_id: int, live: LiveAttempt, reason: str, message: str, data: dict[str, Any]
    ) -> None:
        """A Recovery event; the attempt's gang record is saved with it (a promoted spare, a new one)."""
        with self.store.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            attempt = get_current_attempt(session=session, job=job)
            if attempt is not None and attempt.number == live.attempt:
                attempt.backend_record = live.gang.record()
                # The nodes the attempt runs on now (a promoted spare in a lost node's place): `vlctl status`
                # and a re-attaching controller read them.
                attempt.nodes = [
                    n["name"] if isinstance(n, dict) else str(n)  # the local backend's records, or slot names
                    for n in attempt.backend_record.get("nodes", [])
                ] or attempt.nodes
            append_event(
                session=session,
                now=_dt(self.clock()),
                job=job,
                type=EventType.RECOVERY,
                reason=reason,
                message=message,
                data=data,
                attempt=live.attempt,
            )

    def _reattach(self, job_id: int, spec: TrainingJobSpec) -> LiveAttempt | None:
        """A job this controller did not launch (or launched before it restarted): find its gang again."""
        backend = self._backend(spec)
        run_dir = job_run_dir(spec, self.config.runs_root)
        with self.store.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            attempt = get_current_attempt(session=session, job=job)
            if attempt is None or attempt.backend_record is None:
                # Killed between committing the launch and recording the gang: relaunch it, uncounted.
                reaped = backend.reap(spec.name)
                states.restart(
                    job,
                    session=session,
                    exit_class=SupervisionReason.LAUNCH_INTERRUPTED,
                    detail=f"the launch was interrupted before its gang was recorded ({reaped} process(es) stopped)",
                    counts_toward_limit=False,
                    reason=SupervisionReason.LAUNCH_INTERRUPTED,
                    controller_id=self.id,
                    now=_dt(self.clock()),
                )
                return None
            record, number, started = attempt.backend_record, attempt.number, attempt.started_at
            nodes = list(attempt.nodes)
        gang = backend.attach(record)
        if (resume_spares := getattr(gang, "resume_spares", None)) is not None:
            resume_spares(backend, self._rank_env(spec))  # the spares this controller starts: as the launch's
        live = self._watch(
            job_id, spec, gang, number, run_dir, launched_at=started.timestamp(), nodes=nodes, reattach=True
        )
        live.stopped_by_controller = bool(record.get(STOPPED_BY_CONTROLLER))
        if getattr(gang, "coordinator_url", None) is not None:
            self._resume_following(job_id, live)
        log.info("job %s: re-attached to attempt %d", spec.name, number)
        return live

    def _resume_following(self, job_id: int, live: LiveAttempt) -> None:
        """An in-place recovery the previous controller decided and did not see finish is followed on (its
        RecoveredInPlace event and the goodput ledger), and no hang is called while it is under way."""
        with self.store.transaction() as session:
            rows = session.execute(
                select(Event.reason, Event.data)
                .where(
                    Event.job_id == job_id,
                    Event.attempt == live.attempt,
                    Event.reason.in_(
                        [SupervisionReason.IN_PLACE_STARTED, SupervisionReason.RECOVERED_IN_PLACE]
                    ),
                )
                .order_by(Event.seq)
            ).all()
        started = [data for reason, data in rows if reason == SupervisionReason.IN_PLACE_STARTED and data]
        recovered = [int(data["round"]) for reason, data in rows
                     if reason == SupervisionReason.RECOVERED_IN_PLACE and data]  # fmt: skip
        pending = unfinished_recovery(started, recovered)
        if pending is not None:
            live.recoveries.append(pending)
            log.info("job %s: following the in-place recovery of round %d", live.job_name, pending["round"])

    def _record_progress(self, session: Session, job: Job, live: LiveAttempt, now: float) -> None:
        p = live.progress
        if p.step is not None and p.step != job.current_step:
            job.current_step = p.step
            job.progress_at = _dt(p.last_progress_at or now)
        job.loss = p.loss
        job.tokens_per_second = p.tokens_per_second
        attempt = get_current_attempt(session=session, job=job)
        if attempt is not None:
            if p.first_step_at is not None and attempt.first_step_at is None:
                attempt.first_step_at = _dt(p.first_step_at)
            if p.step is not None:
                attempt.last_step = p.step
            attempt.checkpoint_stall_seconds = live.checkpoint_stall_seconds
            attempt.straggler_seconds = live.straggler_seconds
        live.rank_store.write(
            session=session,
            job_id=job.id,
            attempt=live.attempt,
            rows=list(live.rank_rows(live.gang.rank_pids())),
            now=now,
        )

    def _scan_checkpoints(
        self, session: Session, job: Job, spec: TrainingJobSpec, live: LiveAttempt, now: float
    ) -> None:
        if now - self._last_scan.get(job.id, 0.0) < self.config.checkpoint_scan_seconds:
            return
        self._last_scan[job.id] = now
        root = checkpoint_root(spec.training, job_run_dir(spec, self.config.runs_root))
        sync_checkpoints(
            session=session, job=job, root=root, attempt=live.attempt, save_seconds=live.stage_seconds_by_step
        )

    def _report_straggler(self, session: Session, job: Job, report: StragglerReport) -> None:
        ratio = f", {report.ratio:.2f}x its own baseline" if report.ratio is not None else ""
        append_event(
            session=session,
            now=_dt(self.clock()),
            job=job,
            type=EventType.STRAGGLER,
            reason=SupervisionReason.STRAGGLER_FLAGGED,
            message=(
                f"rank {report.rank} on {report.node} is a straggler: own work {report.own_work_seconds:.3f} s "
                f"vs {report.reference_seconds:.3f} s ({report.slowdown:.2f}x, score {report.score:.1f}{ratio}) "
                f"for {report.windows} windows to step {report.step}; cause: {report.cause or 'unknown'} "
                f"({report.phase or 'no phase times'})"
            ),
            data={
                "rank": report.rank,
                "node": report.node,
                "score": report.score,
                "slowdown": report.slowdown,
                "ratio": report.ratio,
                "phase": report.phase,
                "cause": report.cause,
                "step": report.step,
                "windows": report.windows,
                "node_wide": report.node_wide,
            },
            attempt=job.current_attempt,
        )

    def _consider_exclusion(self, job_id: int, spec: TrainingJobSpec, live: LiveAttempt, now: float) -> None:
        """Gather what `policy.decide_exclusion` weighs for the slowest flagged rank's node, once per node and
        attempt, record its answer as a Decision event and apply it."""
        p = live.progress
        if p.step is None or not p.median_step_seconds:
            return  # no pace measured yet: nothing to weigh
        report = max(live.flagged.values(), key=lambda r: r.slowdown)
        node = report.node
        with self.store.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if self._exclusion_decided(session, job, node, live.attempt):
                return
            excluded = excluded_nodes(session=session, job_id=job.id)
            backend = self._backend(spec)
            decision = decide_exclusion(
                ExclusionCase(
                    report=report,
                    step=p.step,
                    total_steps=spec.training.training.steps,
                    step_seconds=p.median_step_seconds,
                    cost=restart_cost(
                        session=session, job=job, teardown_seconds=self.config.cancel_grace_seconds / 2
                    ),
                    dp=spec.training.parallel.dp,
                    spare_nodes_left=max(0, spec.resources.spare_nodes - len(excluded)),
                    placeable=backend.node_slots(
                        nodes=spec.resources.nodes,
                        spares=spec.resources.spare_nodes,
                        excluded=excluded | {node},
                    )
                    is not None,
                )
            )
            append_event(
                session=session,
                now=_dt(self.clock()),
                job=job,
                type=EventType.DECISION,
                reason=SupervisionReason.EXCLUDE_DECISION,
                message=decision.message,
                data={"node": node, "exclude": decision.exclude, **decision.numbers},
                attempt=live.attempt,
            )
            if not decision.exclude:
                return
            exclude_node(session=session, node=node, reason="Straggler", message=decision.message, job=job)
        # SIGTERM: the trainer finishes its step and saves, so nothing is recomputed.
        live.gang.cancel(self.config.cancel_grace_seconds)
        end = AttemptEnd(
            ranks=(),
            last_step=live.progress.step,
            excluded_node=node,
        )
        self._finish(job_id, spec, live, classify(end, spec.failure_rules()), now=self.clock())

    def _exclusion_decided(self, session: Session, job: Job, node: str, attempt: int) -> bool:
        """Whether `node` was weighed in this attempt already: the decision is made once per node and attempt."""
        decisions = session.scalars(
            select(Event).where(
                Event.job_id == job.id,
                Event.reason == SupervisionReason.EXCLUDE_DECISION,
                Event.attempt == attempt,
            )
        )
        return any(e.data and e.data.get("node") == node for e in decisions)

    def _handle_hang(
        self, job_id: int, spec: TrainingJobSpec, live: LiveAttempt, verdict: HangVerdict, now: float
    ) -> None:
        stacks = live.gang.dump_stacks()
        with self.store.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            append_event(
                session=session,
                now=_dt(self.clock()),
                job=job,
                type=EventType.FAILURE,
                reason=SupervisionReason.STACKS_DUMPED,
                message=f"{verdict.message}; Python stacks of {len(stacks)} rank(s) written to the job's logs",
                data={"ranks": sorted(stacks), "first_stalled": list(verdict.first_stalled)},
                attempt=live.attempt,
            )
        live.gang.cancel(self.config.cancel_grace_seconds)
        end = self._attempt_end(live, hang=verdict)
        self._finish(
            job_id,
            spec,
            live,
            classify(end, spec.failure_rules()),
            now=now,
            failed_at=min(hang_failed_at(verdict), now),
        )

    def _handle_end(
        self,
        job_id: int,
        spec: TrainingJobSpec,
        live: LiveAttempt,
        *,
        codes: dict[str, int | None],
        now: float,
    ) -> None:
        if any(c is None for c in codes.values()):
            # One node failed: the others would wait out torchrun's exit barrier, or block in a collective.
            live.gang.cancel(self.config.cancel_grace_seconds)
            codes = live.gang.poll()
        if (stop_spares := getattr(live.gang, "stop_spares", None)) is not None:
            stop_spares()  # in-place recovery's spares and coordinator end with the attempt
        # Whatever the ranks wrote last (a final step, a checkpoint) counts before the verdict.
        live.absorb(live.telemetry.poll(self.clock()))
        lost = tuple(n for n, c in codes.items() if c == EXIT_LOST)
        end = self._attempt_end(live, lost_nodes=lost, codes=codes)
        result = classify(end, spec.failure_rules())
        # When the first rank died, as its agent recorded it (whole seconds): the detection latency's start.
        died = [w.time for w in live.gang.worker_exits() if w.root_cause and w.time is not None]
        failed_at = min(died[0], now) if died and result.exit_class is not ExitClass.SUCCEEDED else None
        self._finish(job_id, spec, live, result, now=now, failed_at=failed_at)

    def _attempt_end(
        self,
        live: LiveAttempt,
        *,
        hang: HangVerdict | None = None,
        lost_nodes: tuple[str, ...] = (),
        codes: Mapping[str, int | None] | None = None,
    ) -> AttemptEnd:
        exits: dict[int, RankExit] = {}
        log_dir = getattr(live.gang, "log_dir", None)
        for w in live.gang.worker_exits():
            tail = _tail(log_dir / f"rank-{w.rank}.log") if log_dir is not None else ""
            state = live.ranks.get(w.rank)
            exits.setdefault(
                w.rank,
                RankExit.from_returncode(
                    w.rank,
                    w.returncode,
                    node=w.node or (state.node if state else ""),
                    log_tail=tail,
                    root_cause=w.root_cause,
                    agent=w.agent,
                ),
            )
        if codes and not exits:
            # No summary (an agent killed outright): the node's own status stands for its ranks.
            for index, (node, code) in enumerate(sorted(codes.items())):
                if code is not None and code != 0 and code != EXIT_LOST:
                    exits[index] = RankExit.from_returncode(index, code, node=node)
        return AttemptEnd(
            ranks=tuple(exits.values()) if exits else (RankExit(rank=0, exit_code=0),) if codes else (),
            last_step=live.progress.step,
            progressed=live.progress.step is not None or live.progress.last_progress_at is not None,
            hang=hang,
            lost_nodes=lost_nodes,
            preempted=live.stopped_by_controller,
        )

    def _finish(
        self,
        job_id: int,
        spec: TrainingJobSpec,
        live: LiveAttempt,
        result: Classification,
        *,
        now: float,
        failed_at: float | None = None,
    ) -> None:
        self._live.pop(job_id, None)
        with self.store.transaction() as session:
            if not self._still_ours(session, job_id):
                return
            job = session.get(Job, job_id)
            assert job is not None
            if job.phase not in SUPERVISED_PHASES or job.current_attempt != live.attempt:
                return
            self._record_progress(session, job, live, now)
            sync_checkpoints(
                session=session,
                job=job,
                root=checkpoint_root(spec.training, job_run_dir(spec, self.config.runs_root)),
                attempt=live.attempt,
                save_seconds=live.stage_seconds_by_step,
            )
            self._end_attempt(session, job, spec, result, now=now, live=live, failed_at=failed_at)
            update_goodput(session=session, job=job, now=now, finished=job.phase in TERMINAL_PHASES)

    def _end_attempt(
        self,
        session: Session,
        job: Job,
        spec: TrainingJobSpec,
        result: Classification,
        *,
        now: float,
        live: LiveAttempt | None,
        failed_at: float | None = None,
    ) -> None:
        """Record how the attempt ended and move the job on: succeeded, restarting (with backoff) or failed."""
        if result.exit_class is ExitClass.SUCCEEDED:
            if job.phase is Phase.LAUNCHING:
                # Resumed from the checkpoint of the last step: the ranks exit 0 without taking a step.
                states.mark_running(
                    job, session=session, controller_id=self.id, message="no step left", now=_dt(now)
                )
            states.succeed(job, session=session, controller_id=self.id, now=_dt(now))
            return
        record_failure(
            session=session,
            job=job,
            result=result,
            failed_at=failed_at if failed_at is not None else now,
            detected_at=now,
        )
        decision = decide_restart(
            failure_history(session=session, job=job), spec.restart_policy(), u=self.draw()
        )
        # The attempt ends when its processes are gone: after the teardown, later than the detection (`now`).
        ended = _dt(max(now, self.clock()))
        if decision.restart:
            states.restart(
                job,
                session=session,
                exit_class=result.reason,
                detail=decision.message,
                counts_toward_limit=result.counts_toward_limit,
                controller_id=self.id,
                delay_seconds=decision.delay_seconds,
                now=ended,
            )
        else:
            states.fail(
                job,
                session=session,
                message=decision.message,
                reason=decision.reason,
                exit_class=result.reason,
                controller_id=self.id,
                now=ended,
            )


def _tail(path: Path, limit: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
