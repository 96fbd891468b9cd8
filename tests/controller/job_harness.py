"""Jobs run end to end for the controller's tests: a store, a spec, a controller process, and what they recorded.

The controller runs as its own process (`vlctl controller`), the way users run it, so tests can kill it with
SIGKILL and start it again. Ranks are found through the store's rank_status (pids the controller recorded) and
faults are applied from outside with real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from controller.spec import parse_spec
from controller.store import migrate
from controller.store.models import Attempt, Event, Job, RankStatus
from controller.store.repo import create_job
from controller.store.session import Store, StoreConfig, open_store

REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")


def training_section(data: list[str], cache: Path, *, steps: int, interval: int) -> dict[str, Any]:
    return {
        "model": {"name": "mini"},
        "data": {
            "paths": data,
            "row_len": 256,
            "rows_per_step": 4,
            "micro_batch_rows": 1,
            "num_workers": 0,
            "cache_dir": str(cache),
        },
        "parallel": {"dp": 2},
        "training": {"steps": steps, "lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0},
        "checkpoint": {"interval_steps": interval, "async_save": True, "keep_last": 5},
    }


def job_spec(name: str, training: dict[str, Any], **sections: Any) -> dict[str, Any]:
    spec = {
        "name": name,
        "resources": {"nodes": 2, "procs_per_node": 1},
        "training": training,
        "checkpoint_policy": {"interval": training["checkpoint"]["interval_steps"], "min_interval_steps": 1},
        "fault_tolerance": {
            "recovery": "restart",  # the in-place tests say in-place
            "max_restarts": 3,
            "backoff_base_seconds": 0.5,
            "backoff_max_seconds": 2,
            "hang_timeout_seconds": 60,
            "hang_step_factor": 5,
            "startup_timeout_seconds": 300,
        },
        "stragglers": {"window": 5, "warmup_steps": 3, "persistence": 2},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    parse_spec(spec)  # fail here, with the field, rather than in the controller
    return spec


class JobRun:
    """One job in a fresh SQLite store, supervised by controller processes started on demand."""

    def __init__(self, root: Path, spec: dict[str, Any], *, env: dict[str, str] | None = None):
        self.root = root
        self.spec = spec
        self.name = spec["name"]
        self.url = f"sqlite:///{root / 'vlctl.db'}"
        self.env = {**os.environ, "VLCTL_DATABASE_URL": self.url, "OMP_NUM_THREADS": "1", **(env or {})}
        self.store: Store = open_store(StoreConfig(url=self.url))
        migrate.upgrade(self.store)
        self.controller: subprocess.Popen | None = None
        self.submitted_at = time.time()
        with self.store.transaction() as session:
            create_job(session=session, name=self.name, spec=spec)

    # ------------------------------------------------------------------------------------ the controller

    def start_controller(
        self,
        controller_id: str = "ctl-test",
        *,
        trainer_module: str = "trainer.train",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        log = open(self.root / f"controller-{controller_id}.log", "ab")  # noqa: SIM115 - closed with the process
        self.controller = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "controller",
                "--id",
                controller_id,
                "--poll-seconds",
                "0.3",
                "--metrics-port",
                "0",
                # A controller killed in a test is taken over 10 s after its last pass, not the default 30.
                "--lease-seconds",
                "10",
                "--runs-root",
                str(self.root / "runs"),
                "--trainer-module",
                trainer_module,
                *extra_args,
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill_controller(self) -> None:
        assert self.controller is not None
        self.controller.send_signal(signal.SIGKILL)
        self.controller.wait(timeout=30)

    def stop(self) -> None:
        """End the test: cancel the job if it still runs, stop the controller, never leave a process behind."""
        if self.controller is not None and self.controller.poll() is None:
            if self.phase() not in TERMINAL:
                subprocess.run(
                    [sys.executable, "-m", "cli", "cancel", self.name, "--yes"],
                    cwd=REPO,
                    env=self.env,
                    capture_output=True,
                    timeout=60,
                )
                self.wait(lambda: self.phase() in TERMINAL, timeout=60, what="cancelled")
                time.sleep(1.5)  # one more pass tears the ranks down
            self.controller.send_signal(signal.SIGTERM)
            try:
                self.controller.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.controller.kill()
                self.controller.wait()
        from controller.backends.local import LocalBackend

        LocalBackend().reap(self.name)
        self.store.dispose()

    # ------------------------------------------------------------------------------------------- reading

    def job(self) -> Job:
        with self.store.read() as session:
            job = session.scalars(select(Job).where(Job.name == self.name)).one()
            session.expunge(job)
            return job

    def phase(self) -> str:
        return str(self.job().phase)

    def step(self) -> int:
        return self.job().current_step or 0

    def attempts(self) -> list[Attempt]:
        with self.store.read() as session:
            rows = list(session.scalars(select(Attempt).order_by(Attempt.number)))
            for row in rows:
                session.expunge(row)
            return rows

    def events(self) -> list[Event]:
        with self.store.read() as session:
            rows = list(session.scalars(select(Event).order_by(Event.seq)))
            for row in rows:
                session.expunge(row)
            return rows

    def rank_pid(self, rank: int, attempt: int | None = None) -> int:
        def find() -> int | None:
            with self.store.read() as session:
                row = session.scalars(select(RankStatus).where(RankStatus.rank == rank)).first()
                if row is None or row.pid is None or (attempt is not None and row.attempt != attempt):
                    return None
                return row.pid

        return self.wait(find, timeout=120, what=f"rank {rank}'s pid")

    def agent_pid(self, node_index: int, attempt: int) -> int:
        """The torchrun agent of a node of `attempt` (the child of the node's shell that the store recorded)."""
        import psutil

        def find() -> int | None:
            rows = [a for a in self.attempts() if a.number == attempt and a.backend_record]
            if not rows:
                return None
            shell = psutil.Process(rows[0].backend_record["nodes"][node_index]["pid"])
            agents = [c for c in shell.children() if "torch.distributed.run" in " ".join(c.cmdline())]
            return agents[0].pid if agents else None

        return self.wait(find, timeout=120, what=f"the agent of node {node_index}, attempt {attempt}")

    def wait_attempt_step(self, attempt: int, step: int, timeout: float = 240) -> None:
        """Until attempt `attempt` has reported step `step` (a new attempt starts its count again)."""

        def reached() -> bool:
            with self.store.read() as session:
                rows = session.scalars(select(RankStatus).where(RankStatus.attempt == attempt)).all()
                return bool(rows) and all((r.step or 0) >= step for r in rows)

        self.wait(reached, timeout=timeout, what=f"step {step} of attempt {attempt}")

    def run_dir(self) -> Path:
        return self.root / "runs" / self.name

    def losses(self) -> dict[int, float]:
        """Rank 0's loss per step index, the last record of each step (a resumed attempt repeats steps)."""
        out: dict[int, float] = {}
        for line in (self.run_dir() / "metrics-rank0.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record and "step_seconds" in record:
                out[record["step"]] = record["loss"]
        return out

    def first_step_after(self, t: float, *, attempt: int | None = None) -> float | None:
        """Unix time of the first step line (rank 0, of `attempt` if given) written after `t`."""
        path = self.run_dir() / "metrics-rank0.jsonl"
        if not path.exists():
            return None
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            if "step_seconds" in record and record["time"] > t and attempt in (None, record.get("attempt")):
                return record["time"]
        return None

    # --------------------------------------------------------------------------------------------- waits

    def wait(self, check: Callable[[], Any], *, timeout: float, what: str, every: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            if (
                self.controller is not None
                and self.controller.poll() is not None
                and self.phase() not in TERMINAL
            ):
                raise AssertionError(
                    f"the controller exited ({self.controller.returncode}) waiting for {what}"
                )
            time.sleep(every)
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {what} (job: {self.phase()})\n{self.story()}"
        )

    def story(self, *, lines: int = 12) -> str:
        """What a failed wait needs to be understood from CI's output alone: the job's events and the last lines
        of each rank's log in the newest attempt's folder, and of each controller's log."""
        out = [f"{e.time:%H:%M:%S.%f} {e.reason}: {e.message}" for e in self.events()]
        attempts = sorted(
            (self.run_dir() / "logs").glob("attempt-*"), key=lambda p: int(p.name.split("-")[1])
        )
        logs = sorted(attempts[-1].glob("*.log")) if attempts else []
        for path in [*logs, *sorted(self.root.glob("controller-*.log"))]:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out += [f"--- {path.name}", *tail]
        return "\n".join(out)

    def wait_step(self, step: int, timeout: float = 240, every: float = 0.05) -> None:
        self.wait(lambda: self.step() >= step, timeout=timeout, what=f"step {step}", every=every)

    def wait_done(self, timeout: float = 300) -> str:
        return self.wait(
            lambda: self.phase() if self.phase() in TERMINAL else None, timeout=timeout, what="the end"
        )
