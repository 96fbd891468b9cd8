"""An in-memory backend for the reconcile loop's fast tests: the test decides when nodes exit and what the ranks
report, and a fake trainer writes real checkpoint folders (manifest with sizes and CRC-32), so the controller's
decisions run on exactly the inputs a test scripts, in milliseconds and without a process.

- `FakeClock`: the controller's `clock`; tests move it with `advance`.
- `FakeBackend` implements `controller.backends.base.Backend` and records everything the controller asks:
  launches (with the attempt's config file as the controller wrote it), attaches, reaps, telemetry sources.
- `FakeGang` implements `GangHandle`. Nodes run until the test scripts an exit (`exit_node`, `crash`,
  `succeed`), optionally at a later clock time. `cancel` stops the nodes still running with SIGTERM's code.
  Its fake trainer starts at the config's `checkpoint.resume_step` and `run_steps` feeds the attempt's
  telemetry step by step, saving a checkpoint every `checkpoint.interval_steps` steps and at the last step
  (with a `stage` operation of `save_seconds` on rank 0), as `trainer.runtime` does.
- `FakeTelemetry` implements `TelemetrySource`: updates pushed with a time are delivered by the first poll at
  or after it; rank states accumulate as a real source's do.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.backends.torchrun_log import WorkerExit
from controller.ingest import CheckpointOp, RankState, TelemetryUpdate
from controller.stragglers import StepSample
from trainer.contract.checkpoint import FORMAT, MANIFEST, META, crc_hex, rank_filename, step_dirname

NODE_PREFIX = "node-"
SIGTERM_CODE = -int(signal.SIGTERM)  # Popen style: killed by SIGTERM
SIGKILL_CODE = -int(signal.SIGKILL)


class FakeClock:
    """Unix seconds that move only when a test says so. The default start lies in the past on purpose: any
    time the controller takes from the wall clock instead of its `clock` shows up as a wrong answer."""

    def __init__(self, start: float = 1_600_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class ControllerDied(BaseException):
    """Raised by a scripted launch right after the gang started: the controller process 'dies' there (a
    BaseException, so no `except Exception` of the loop catches it, as nothing catches a SIGKILL)."""


# ------------------------------------------------------------------------------------------ checkpoints


def write_checkpoint(root: Path, step: int, *, world_size: int = 1, payload: bytes = b"") -> Path:
    """A committed step folder in the trainer's layout: rank files, meta.json, then manifest.json, renamed
    into place (the commit). Returns the folder."""
    final = Path(root) / step_dirname(step)
    if final.exists():  # already saved at this step (a graceful stop right after a periodic save)
        return final
    tmp = Path(root) / f"{step_dirname(step)}.tmp-{os.getpid()}{threading.get_ident()}"
    tmp.mkdir(parents=True)
    files: list[dict[str, Any]] = []
    for rank in range(world_size):
        data = payload or f"step {step} rank {rank} ".encode() * 8
        (tmp / rank_filename(rank)).write_bytes(data)
        files.append(_manifest_entry(rank_filename(rank), data, rank))
    meta = json.dumps({"format": FORMAT, "step": step}).encode()
    (tmp / META).write_bytes(meta)
    files.append(_manifest_entry(META, meta, 0))
    manifest = {"format": FORMAT, "step": step, "world_size": world_size, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    tmp.rename(final)
    return final


def corrupt_checkpoint(root: Path, step: int) -> Path:
    """Flip one byte of rank 0's file: the size still matches the manifest, the CRC-32 does not."""
    path = Path(root) / step_dirname(step) / rank_filename(0)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _manifest_entry(name: str, data: bytes, rank: int) -> dict[str, Any]:
    return {"path": name, "size": len(data), "crc32": crc_hex(zlib.crc32(data)), "rank": rank}


# ------------------------------------------------------------------------------------------ telemetry


@dataclass(slots=True)
class _Pending:
    at: float
    steps: list[StepSample]
    ranks: list[RankState]
    ops: list[CheckpointOp]


class FakeTelemetry:
    """One attempt's telemetry: what the test pushed, delivered once the poll's `now` reaches its time."""

    def __init__(self, attempt: int, rank_nodes: Sequence[str]):
        self.attempt = attempt
        self.rank_nodes = list(rank_nodes)
        self.polls = 0
        self.closed = False
        self._pending: list[_Pending] = []
        self._ranks: dict[int, RankState] = {}
        self._lock = threading.Lock()

    def push(
        self,
        *,
        at: float,
        steps: Sequence[StepSample] = (),
        ranks: Sequence[RankState] = (),
        checkpoint_ops: Sequence[CheckpointOp] = (),
    ) -> None:
        with self._lock:
            self._pending.append(_Pending(at, list(steps), list(ranks), list(checkpoint_ops)))

    def poll(self, now: float) -> TelemetryUpdate:
        with self._lock:
            self.polls += 1
            due = [p for p in self._pending if p.at <= now]
            self._pending = [p for p in self._pending if p.at > now]
            steps: list[StepSample] = []
            ops: list[CheckpointOp] = []
            for p in due:
                steps += p.steps
                ops += p.ops
                self._ranks.update({r.rank: r for r in p.ranks})
            return TelemetryUpdate(
                attempt=self.attempt, steps=steps, ranks=dict(self._ranks), checkpoint_ops=ops
            )

    def start_attempt(self, attempt: int, *, launched_at: float | None = None) -> None:
        with self._lock:
            self.attempt = attempt
            self._ranks.clear()

    def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------------------------------------ gangs


@dataclass(kw_only=True)
class Launch:
    """One `Backend.launch` call as the controller made it."""

    job_name: str
    attempt: int
    config_path: Path
    config: dict[str, Any]  # the config file's contents at launch
    overrides: list[str]
    nodes: list[str]
    procs_per_node: int
    run_dir: Path
    env: dict[str, str]
    excluded: list[str]
    at: float


OwnWork = float | Mapping[int, float] | Callable[[int, int], float]  # seconds; per rank; f(rank, step)


class FakeGang:
    def __init__(self, backend: FakeBackend, launch: Launch, token: str, pid_base: int):
        self.backend = backend
        self.launch = launch
        self.job_name = launch.job_name
        self.attempt = launch.attempt
        self.token = token
        self.nodes = list(launch.nodes)
        self.procs_per_node = launch.procs_per_node
        self.world_size = len(self.nodes) * self.procs_per_node
        self.log_dir = Path(launch.run_dir) / "logs" / f"attempt-{launch.attempt}"
        self.cancels: list[float] = []  # grace seconds of each cancel
        self.detaches = 0
        self.attaches = 0
        self.stack_dumps = 0
        self.save_on_sigterm = False  # the trainer's graceful stop: finish the step, save, exit
        self._pid_base = pid_base
        self._exits: dict[str, tuple[float, int]] = {}  # node -> (clock time, exit code)
        self._worker_exits: list[WorkerExit] = []
        self._lock = threading.Lock()
        # The fake trainer, configured by the file the controller wrote.
        config = launch.config
        checkpoint = config["checkpoint"]
        resumed = checkpoint["resume"] != "none" and checkpoint["resume_step"] is not None
        self.step = int(checkpoint["resume_step"]) if resumed else 0  # steps done
        self.total_steps = int(config["training"]["steps"])
        self.interval_steps = int(checkpoint["interval_steps"])
        root = Path(checkpoint["dir"])
        self.checkpoint_root = root if root.is_absolute() else Path(config["run_dir"]) / root
        self._tokens = 0.0

    # ---------------------------------------------------------------------------------- scripting

    @property
    def telemetry(self) -> FakeTelemetry:
        return self.backend.source(self.job_name, self.attempt, self.rank_nodes)

    @property
    def rank_nodes(self) -> list[str]:
        return [self.nodes[r // self.procs_per_node] for r in range(self.world_size)]

    def exit_node(self, node: str, code: int, *, at: float | None = None) -> None:
        """`node` ends with `code` at clock time `at` (now by default), unless it ended already."""
        with self._lock:
            self._exits.setdefault(node, (self.backend.clock() if at is None else at, code))

    def crash(self, rank: int, code: int = 1, *, log: str = "", at: float | None = None) -> None:
        """Rank `rank` exits with `code`: its torchrun agent exits 1 and lists the rank's code in its summary."""
        if log:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            (self.log_dir / f"rank-{rank}.log").write_text(log)
        at = self.backend.clock() if at is None else at
        with self._lock:
            self._worker_exits.append(
                WorkerExit(
                    rank=rank,
                    local_rank=rank % self.procs_per_node,
                    returncode=code,
                    pid=self._pid(rank),
                    root_cause=not self._worker_exits,
                    time=float(math.floor(at)),  # the agent's record has whole seconds
                )
            )
        self.exit_node(self.rank_nodes[rank], 1, at=at)

    def succeed(self, *, at: float | None = None) -> None:
        for node in self.nodes:
            self.exit_node(node, 0, at=at)

    def run_steps(
        self,
        count: int,
        *,
        step_seconds: float = 1.0,
        own_work: OwnWork | None = None,
        save_seconds: float = 0.5,
        loss: float = 2.0,
    ) -> None:
        """The trainer completes `count` more steps, the last one ending now, `step_seconds` apart: a step
        sample and rank state per rank, and a checkpoint where one is due."""
        now = self.backend.clock()
        count = min(count, self.total_steps - self.step)
        for j in range(count):
            index = self.step  # telemetry numbers a step by its index; the trainer's step counts steps done
            t = now - (count - 1 - j) * step_seconds
            samples, states = [], []
            self._tokens += 1000.0
            for rank, node in enumerate(self.rank_nodes):
                work = self._own_work(own_work, rank, index, step_seconds)
                samples.append(
                    StepSample(
                        rank=rank,
                        node=node,
                        step=index,
                        own_work_seconds=work,
                        phase_seconds={"forward": work / 3, "backward": 2 * work / 3},
                        wall_seconds=step_seconds,
                        attempt=self.attempt,
                    )
                )
                states.append(
                    RankState(
                        rank=rank,
                        attempt=self.attempt,
                        node=node,
                        step=index,
                        last_progress=t,
                        step_seconds=step_seconds,
                        own_work_seconds=work,
                        loss=loss,
                        text_tokens_total=self._tokens,
                        updated_at=t,
                    )
                )
            self.step += 1
            ops = []
            if self.step % self.interval_steps == 0 or self.step == self.total_steps:
                self.save_checkpoint()
                ops.append(CheckpointOp(rank=0, step=self.step, operation="stage", seconds=save_seconds))
            self.telemetry.push(at=t, steps=samples, ranks=states, checkpoint_ops=ops)

    def save_checkpoint(self) -> Path:
        return write_checkpoint(self.checkpoint_root, self.step, world_size=self.world_size)

    def _own_work(self, own_work: OwnWork | None, rank: int, step: int, step_seconds: float) -> float:
        if own_work is None:
            return 0.8 * step_seconds
        if callable(own_work):
            return own_work(rank, step)
        if isinstance(own_work, Mapping):
            return own_work.get(rank, 0.8 * step_seconds)
        return float(own_work)

    def _pid(self, rank: int) -> int:
        return self._pid_base + 1 + rank

    def _running(self, now: float) -> list[str]:
        return [n for n in self.nodes if n not in self._exits or self._exits[n][0] > now]

    # ---------------------------------------------------------------------------------- GangHandle

    def poll(self) -> dict[str, int | None]:
        now = self.backend.clock()
        with self._lock:
            return {
                n: (self._exits[n][1] if n in self._exits and self._exits[n][0] <= now else None)
                for n in self.nodes
            }

    def pids(self) -> dict[str, list[int]]:
        running = set(self._running(self.backend.clock()))
        return {
            node: [
                self._pid_base + 100 + i,
                *(self._pid(r) for r, n in enumerate(self.rank_nodes) if n == node),
            ]
            if node in running
            else []
            for i, node in enumerate(self.nodes)
        }

    def rank_pids(self) -> dict[int, int]:
        running = set(self._running(self.backend.clock()))
        return {r: self._pid(r) for r, node in enumerate(self.rank_nodes) if node in running}

    def worker_exits(self) -> list[WorkerExit]:
        with self._lock:
            return sorted(self._worker_exits, key=lambda e: (not e.root_cause, e.rank))

    def dump_stacks(self) -> dict[int, str]:
        self.stack_dumps += 1
        return {r: f"Thread 0x1 (most recent call first):\n  rank {r} waiting" for r in self.rank_pids()}

    def cancel(self, grace_seconds: float) -> None:
        now = self.backend.clock()
        self.cancels.append(grace_seconds)
        running = self._running(now)
        if running and self.save_on_sigterm:
            self.save_checkpoint()
        with self._lock:
            for node in running:
                self._exits[node] = (now, SIGTERM_CODE)

    def kill(self) -> int:
        """SIGKILL whatever still runs (a reap); returns how many processes that was (agent and workers)."""
        now = self.backend.clock()
        with self._lock:
            running = self._running(now)
            for node in running:
                self._exits[node] = (now, SIGKILL_CODE)
        return len(running) * (1 + self.procs_per_node)

    def detach(self) -> None:
        self.detaches += 1

    def record(self) -> dict[str, Any]:
        return {"job_name": self.job_name, "attempt": self.attempt, "token": self.token, "nodes": self.nodes}

    @property
    def ended(self) -> bool:
        return not self._running(self.backend.clock())


# ------------------------------------------------------------------------------------------ the backend


@dataclass(slots=True)
class TelemetryCall:
    job_name: str
    attempt: int
    rank_nodes: list[str]
    reattach: bool


class FakeBackend:
    """Thread-safe: controllers in several threads may share one (the claim tests count launches here)."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.launches: list[Launch] = []
        self.gangs: list[FakeGang] = []
        self.attached: list[dict[str, Any]] = []
        self.reaps: list[tuple[str, int]] = []  # (job name, processes stopped)
        self.telemetry_calls: list[TelemetryCall] = []
        self.launch_errors: dict[str, Exception] = {}  # job name -> raised by its next launch (once)
        self.die_after_launch: set[str] = set()  # job names whose next launch "kills the controller" (once)
        self.sources: dict[tuple[str, int], FakeTelemetry] = {}
        self._lock = threading.RLock()

    # ---------------------------------------------------------------------------------- for tests

    def launches_of(self, job_name: str) -> list[Launch]:
        with self._lock:
            return [launch for launch in self.launches if launch.job_name == job_name]

    def gang(self, job_name: str, attempt: int | None = None) -> FakeGang:
        """The job's gang of `attempt`, or its newest one."""
        with self._lock:
            mine = [
                g for g in self.gangs if g.job_name == job_name and (attempt is None or g.attempt == attempt)
            ]
        if not mine:
            raise LookupError(f"no gang of job {job_name!r}" + (f" attempt {attempt}" if attempt else ""))
        return mine[-1]

    def source(self, job_name: str, attempt: int, rank_nodes: Sequence[str] = ()) -> FakeTelemetry:
        with self._lock:
            key = (job_name, attempt)
            if key not in self.sources:
                self.sources[key] = FakeTelemetry(attempt, rank_nodes)
            return self.sources[key]

    # ---------------------------------------------------------------------------------- Backend

    def launch(
        self,
        *,
        job_name: str,
        attempt: int,
        config_path: str | Path,
        overrides: Sequence[str],
        nodes: int,
        procs_per_node: int,
        run_dir: str | Path,
        env: Mapping[str, str] | None = None,
        names: Sequence[str] | None = None,
        excluded: Collection[str] = (),
        hot_spares: int | None = None,
    ) -> FakeGang:
        names = list(names) if names is not None else [f"{NODE_PREFIX}{i}" for i in range(nodes)]
        if len(names) != nodes:
            raise ValueError(f"names: expected {nodes} node names, got {names}")
        launch = Launch(
            job_name=job_name,
            attempt=attempt,
            config_path=Path(config_path),
            config=json.loads(Path(config_path).read_text()),
            overrides=list(overrides),
            nodes=names,
            procs_per_node=procs_per_node,
            run_dir=Path(run_dir),
            env=dict(env or {}),
            excluded=sorted(excluded),
            at=self.clock(),
        )
        with self._lock:
            self.launches.append(launch)
            if (error := self.launch_errors.pop(job_name, None)) is not None:
                raise error
            gang = FakeGang(
                self,
                launch,
                token=f"{job_name}-{attempt}-{len(self.gangs)}",
                pid_base=1000 * (len(self.gangs) + 1),
            )
            self.gangs.append(gang)
            died = job_name in self.die_after_launch
            self.die_after_launch.discard(job_name)
        if died:
            raise ControllerDied(f"controller killed right after launching {job_name} attempt {attempt}")
        return gang

    def attach(self, record: Mapping[str, Any]) -> FakeGang:
        with self._lock:
            self.attached.append(dict(record))
            gang = next((g for g in self.gangs if g.token == record.get("token")), None)
        if gang is None:
            raise ValueError(f"gang record: no gang with token {record.get('token')!r}")
        gang.attaches += 1
        return gang

    def reap(self, job_name: str, *, keep: Sequence[str] = ()) -> int:
        with self._lock:
            gangs = [g for g in self.gangs if g.job_name == job_name and g.token not in keep]
        stopped = sum(g.kill() for g in gangs)
        with self._lock:
            self.reaps.append((job_name, stopped))
        return stopped

    def node_slots(self, *, nodes: int, spares: int, excluded: Collection[str]) -> list[str] | None:
        usable = [f"{NODE_PREFIX}{i}" for i in range(nodes + spares) if f"{NODE_PREFIX}{i}" not in excluded]
        return usable[:nodes] if len(usable) >= nodes else None

    def telemetry(
        self,
        *,
        job_name: str,
        run_dir: Path,
        num_ranks: int,
        attempt: int,
        rank_nodes: Sequence[str],
        reattach: bool,
    ) -> FakeTelemetry:
        with self._lock:
            self.telemetry_calls.append(TelemetryCall(job_name, attempt, list(rank_nodes), reattach))
            source = self.source(job_name, attempt, rank_nodes)
        if len(source.rank_nodes) != num_ranks:
            raise ValueError(f"rank_nodes: expected {num_ranks} nodes, got {len(source.rank_nodes)}")
        return source
