"""The simulated backend: what the reconciler launches, polls, cancels and recovers, served from a `World`.

`SimBackend` implements controller.backends.base.Backend; `SimGang` the GangHandle with the in-place extras the
reconciler looks for (coordinator_url, spares, promote, kill_ranks, node_end_time); `SimTelemetry` the
TelemetrySource. In-place recovery's coordinator is served over HTTP on 127.0.0.1 (`CoordinatorServer`), because
the reconciler's CoordinatorClient speaks HTTP; its status carries simulated times.

Granularity (stated in docs/scale.md):

- Telemetry: every poll returns each rank's newest state (step, last progress) and one step sample, rank 0's
  newest step, plus a `stage` checkpoint operation for every checkpoint committed since the last poll. Per-rank
  step samples are not generated: straggler detection is not exercised by the simulation.
- The coordinator's round status reports the replaced ranks and one survivor (the others join and resume at
  the same simulated time), and only the newest rounds: the reconciler reads no more than that.
- Blocking calls take simulated time: a gang's `cancel` advances the clock by the teardown cost.
"""

from __future__ import annotations

import json
import math
import threading
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.backends.base import EXIT_LOST
from controller.backends.torchrun_log import WorkerExit
from controller.ingest import CheckpointOp, RankColumns, TelemetryUpdate
from controller.stragglers import StepSample
from trainer.contract.checkpoint import FORMAT, MANIFEST, META, crc_hex, rank_filename, step_dirname
from trainer.contract.telemetry import EXIT_PREEMPTED

if TYPE_CHECKING:  # the world imports this module; this one needs its types only
    from controller.simulate.world import Timeline, World

SIGTERM_CODE = -15
ROUNDS_SHOWN = 3
EXIT_CODE = {"crash": 1, "node_lost": EXIT_LOST, "planned": EXIT_PREEMPTED}


class SimClock:
    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------ checkpoints


def write_checkpoint_dir(root: Path, step: int) -> None:
    """A committed step folder in the trainer's layout (one small file, meta, manifest, then the rename), so the
    controller's listing and CRC-32 verification run on it unchanged."""
    final = root / step_dirname(step)
    if final.exists():
        return
    staging = root / f"{step_dirname(step)}.tmp-sim"
    staging.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, body in ((rank_filename(0), f"simulated state at step {step}".encode()),
                       (META, json.dumps({"format": FORMAT, "step": step}).encode())):  # fmt: skip
        (staging / name).write_bytes(body)
        entries.append({"path": name, "size": len(body), "crc32": crc_hex(zlib.crc32(body)), "rank": 0})
    (staging / MANIFEST).write_text(
        json.dumps({"format": FORMAT, "step": step, "world_size": 1, "files": entries})
    )
    staging.rename(final)


def remove_checkpoint_dir(root: Path, step: int) -> None:
    folder = root / step_dirname(step)
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


# ------------------------------------------------------------------------------------------ the coordinator


@dataclass(slots=True)
class Round:
    number: int
    opened_at: float
    replaced: dict[int, str]  # rank -> member
    survivor: int  # the rank that reports for the ranks that stayed
    joined_at: float
    resumed_at: float
    step: int  # the snapshot step every rank goes back to
    done: int  # the most steps a rank had completed

    def status(self, now: float) -> dict[str, Any]:
        ranks = [*self.replaced, self.survivor]
        joined = {str(r): {"time": self.joined_at} for r in ranks} if now >= self.joined_at else {}
        resumed = (
            {str(r): {"step": self.step, "done": self.done, "time": self.resumed_at} for r in ranks}
            if now >= self.resumed_at
            else {}
        )
        return {
            "round": self.number,
            "replaced": sorted(self.replaced),
            "assignments": {m: r for r, m in self.replaced.items()},
            "opened_at": self.opened_at,
            "joined": joined,
            "resumed": resumed,
        }


class CoordinatorServer:
    """One HTTP server for every simulated gang's coordinator: /g<attempt>/v1/status and /v1/replace."""

    def __init__(self) -> None:
        self.gangs: dict[str, SimGang] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def _answer(self, body: dict[str, Any] | None) -> None:
                prefix, _, path = self.path.lstrip("/").partition("/")
                gang = server.gangs.get(prefix)
                try:
                    if gang is None:
                        raise LookupError(f"no coordinator {prefix}")
                    reply = gang.coordinator_call("/" + path, body)
                    status = HTTPStatus.OK
                except (LookupError, ValueError) as err:
                    reply, status = {"error": str(err)}, HTTPStatus.CONFLICT
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - the base class's name
                self._answer(None)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                self._answer(json.loads(self.rfile.read(length) or b"{}"))

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, name="sim-coordinator", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


# ------------------------------------------------------------------------------------------ gangs


@dataclass(slots=True)
class NodeEnd:
    visible_at: float  # when the backend reports it (the failure plus its detection)
    code: int
    failed_at: float  # when it really ended


@dataclass(kw_only=True)
class SimGang:
    world: World
    job_name: str
    attempt: int
    nodes: list[str]
    interval: int
    launched_at: float
    timeline: Timeline  # the current stretch of training
    in_place: bool
    stopped_at: float | None = None  # progress stopped (a failure, a hang, the teardown)
    hung: str | None = None  # the node whose hang stopped progress
    ends: dict[str, NodeEnd] = field(default_factory=dict)
    root: WorkerExit | None = None
    spares: dict[str, float] = field(default_factory=dict)  # name -> ready at
    rounds: list[Round] = field(default_factory=list)
    failed_round: int = 0
    cancelled: bool = False
    first_step_reported: bool = False
    ops_after: int = 0  # checkpoint ops reported up to this step
    rank_names: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"g{self.attempt}"

    @property
    def coordinator_url(self) -> str | None:
        return f"{self.world.coordinator.url}/{self.key}" if self.in_place else None

    can_start_spares = True

    # ---------------------------------------------------------------------------------- what the world does

    def progress_time(self, now: float) -> float:
        return now if self.stopped_at is None else min(now, self.stopped_at)

    def done(self, now: float) -> int:
        return self.timeline.done_at(self.progress_time(now))

    def fail(self, node_index: int, seen_as: str, at: float, detect_s: float) -> str:
        """A failure reaches the gang at `at`; returns the node's name."""
        node = self.nodes[node_index]
        if self.stopped_at is None or self.stopped_at > at:
            self.stopped_at = at
        if seen_as == "hang":
            self.hung = self.hung or node
            return node
        if node not in self.ends:
            code = EXIT_CODE[seen_as]
            self.ends[node] = NodeEnd(at + detect_s, code, at)
            if self.root is None:
                self.root = WorkerExit(
                    rank=node_index,
                    local_rank=0,
                    returncode=code if code != EXIT_LOST else -9,
                    pid=self._pid(node_index),
                    root_cause=True,
                    time=float(math.floor(at)),
                )
        return node

    def open_round(self, *, ranks: list[int], members: list[str], now: float) -> Round:
        costs = self.world.costs
        failed_at = self.stopped_at if self.stopped_at is not None else now
        done = self.timeline.done_at(failed_at)
        step0 = self.timeline.step0
        snapshot = max(step0, done - 1)  # at most one completed step done again
        survivor = next(r for r in range(len(self.nodes)) if r not in ranks)
        joined = now + costs.regroup_s
        rnd = Round(
            number=len(self.rounds) + 1,
            opened_at=now,
            replaced={r: m for r, m in zip(ranks, members, strict=True)},
            survivor=survivor,
            joined_at=joined,
            resumed_at=joined + costs.restore_s,
            step=snapshot,
            done=done,
        )
        self.rounds.append(rnd)
        self.world.resume_in_place(self, rnd)
        return rnd

    def coordinator_call(self, path: str, body: Mapping[str, Any] | None) -> dict[str, Any]:
        now = self.world.clock()
        if path == "/v1/status":
            return {
                "round": len(self.rounds),
                "world_size": len(self.nodes),
                "spares_waiting": [f"{s}/0" for s, ready in self.spares.items() if ready <= now],
                "committed_step": self.done(now),
                "rounds": [r.status(now) for r in self.rounds[-ROUNDS_SHOWN:]],
            }
        if path == "/v1/replace" and body is not None:
            if int(body["failed_round"]) != len(self.rounds):
                raise ValueError(
                    f"failed_round: {body['failed_round']}, but the current round is {len(self.rounds)}"
                )
            members = [str(m) for m in body.get("members") or []]
            waiting = {f"{s}/0" for s, ready in self.spares.items() if ready <= now}
            if not members or any(m not in waiting for m in members):
                raise ValueError(f"members {members} are not waiting")
            return self.open_round(ranks=[int(r) for r in body["ranks"]], members=members, now=now).status(
                now
            )
        raise LookupError(f"no such call {path}")

    # ---------------------------------------------------------------------------------- GangHandle

    def poll(self) -> dict[str, int | None]:
        now = self.world.clock()
        out: dict[str, int | None] = {}
        for n in self.nodes:
            end = self.ends.get(n)
            out[n] = end.code if end is not None and end.visible_at <= now else None
        return out

    def pids(self) -> dict[str, list[int]]:
        codes = self.poll()
        return {n: [self._pid(i)] for i, n in enumerate(self.nodes) if codes[n] is None}

    def rank_pids(self) -> dict[int, int]:
        codes = self.poll()
        return {i: self._pid(i) for i, n in enumerate(self.nodes) if codes[n] is None}

    def worker_exits(self) -> list[WorkerExit]:
        return [self.root] if self.root is not None and self.root.rank < len(self.nodes) else []

    def dump_stacks(
        self, texts: dict[int, str] | None = None, pids: Mapping[int, int] | None = None
    ) -> dict[int, str]:
        """Every live rank's main thread: the hung node's stuck on its own, the others in a collective."""
        out = {}
        for rank in pids if pids is not None else self.rank_pids():
            where = (
                "    step (trainer/runtime.py:1)"
                if self.nodes[rank] == self.hung
                else "    all_reduce (torch/distributed/distributed_c10d.py:1)"
            )
            out[rank] = f'Thread 1 (idle): "MainThread"\n{where}\n'
        if texts is not None:
            texts.update(out)
        return out

    def stopped_ranks(self, pids: Mapping[int, int] | None = None) -> set[int]:
        return set()

    def kill_ranks(self, ranks: Sequence[int], pids: Mapping[int, int] | None = None) -> list[int]:
        now = self.world.clock()
        killed = []
        for rank in ranks:
            node = self.nodes[rank]
            if node not in self.ends:
                self.ends[node] = NodeEnd(now, -9, now)
                killed.append(self._pid(rank))
            if node == self.hung:
                self.hung = None
        return killed

    def lost_workers(self) -> list[str]:
        return []  # a node's end is reported through poll() once detected

    def node_end_time(self, name: str) -> float | None:
        end = self.ends.get(name)
        return None if end is None else end.failed_at

    def live_spares(self) -> list[str]:
        return list(self.spares)

    def lost_spares(self) -> list[tuple[str, int]]:
        return []

    def coordinator_exit(self) -> int | None:
        return None

    def start_spare(self) -> str | None:
        return self.world.start_spare(self)

    def promote(self, spare: str, *, replacing: str) -> None:
        self.spares.pop(spare)
        self.nodes[self.nodes.index(replacing)] = spare
        self.world.node_replaced(self, replacing)

    def stop_spares(self) -> None:
        self.spares.clear()

    def cancel(self, grace_seconds: float) -> None:
        """SIGTERM to every node still running; the teardown takes simulated time."""
        world = self.world
        now = world.clock()
        if self.cancelled:
            return
        self.cancelled = True
        if self.stopped_at is None or self.stopped_at > now:
            self.stopped_at = now
        for n in self.nodes:
            if n not in self.ends or self.ends[n].visible_at > now:
                self.ends[n] = NodeEnd(now, SIGTERM_CODE, now)
        self.spares.clear()
        world.gang_ended(self)
        world.clock.now = now + min(world.costs.teardown_s, grace_seconds or world.costs.teardown_s)

    def detach(self) -> None:
        pass

    def record(self) -> dict[str, Any]:
        # No node list: the controller reloads every attempt's row on every pass (update_goodput), so a record
        # that grows with the job slows every pass of a long job (docs/scale.md, "What the simulation found").
        return {"job_name": self.job_name, "attempt": self.attempt, "simulated": True}

    def _pid(self, index: int) -> int:
        return 100_000 * self.attempt + index


# ------------------------------------------------------------------------------------------ telemetry


class SimTelemetry:
    """The attempt's telemetry, read off its gang at the poll's time (see the module's granularity)."""

    def __init__(self, gang: SimGang):
        self.gang = gang
        self.attempt = gang.attempt
        self._columns = RankColumns(len(gang.nodes), gang.attempt, gang.nodes)

    def poll(self, now: float) -> TelemetryUpdate:
        g = self.gang
        world = g.world
        tl = g.timeline
        done = g.done(now)
        c = self._columns
        c.clear(g.attempt)
        steps: list[StepSample] = []
        ops: list[CheckpointOp] = []
        if done > tl.step0 or g.first_step_reported:
            last = tl.end_of(done) if done > tl.step0 else tl.t0
            step_s = world.step_seconds(g)
            if c.node.tolist() != list(g.nodes):  # in-place recovery renamed a node
                c.reassign(g.nodes)
            # Every rank alike, in columns: at 16,384 ranks a RankState each per poll was the simulation's cost.
            c.reported[:] = True
            c.step[:] = done - 1
            c.last_progress[:] = last
            c.step_seconds[:] = step_s
            c.own_work_seconds[:] = 0.8 * step_s
            c.loss[:] = 2.0
            c.text_tokens_total[:] = float(done)
            c.updated_at[:] = now
            if done > tl.step0:
                g.first_step_reported = True
                steps.append(StepSample(rank=0, node=g.nodes[0], step=done - 1, own_work_seconds=0.8 * step_s,
                                        wall_seconds=step_s, attempt=g.attempt))  # fmt: skip
        for c_ in tl.checkpoints_between(g.ops_after, g.progress_time(now)):
            ops.append(CheckpointOp(rank=0, step=c_, operation="stage", seconds=world.costs.save_s))
            g.ops_after = c_
        return TelemetryUpdate(attempt=g.attempt, steps=steps, ranks=c.view(), checkpoint_ops=ops)

    def reassign(self, rank_nodes: Sequence[str]) -> None:
        pass  # the gang's node list is the truth; states are built from it at each poll

    def start_attempt(self, attempt: int, *, launched_at: float | None = None) -> None:
        self.attempt = attempt

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ the backend


class SimBackend:
    def __init__(self, world: World):
        self.world = world

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
    ) -> SimGang:
        config = json.loads(Path(config_path).read_text())
        checkpoint = config["checkpoint"]
        resume = int(checkpoint["resume_step"]) if checkpoint["resume"] != "none" else 0
        names = list(names) if names is not None else [f"n{i}" for i in range(nodes)]
        return self.world.launch(
            job_name=job_name,
            attempt=attempt,
            nodes=names,
            interval=int(checkpoint["interval_steps"]),
            resume_step=resume,
            hot_spares=hot_spares,
        )

    def attach(self, record: Mapping[str, Any]) -> SimGang:
        gang = self.world.gang
        if gang is None or gang.attempt != record.get("attempt"):
            raise ValueError(f"gang record: no simulated gang of attempt {record.get('attempt')}")
        return gang

    def reap(self, job_name: str, *, keep: Sequence[str] = ()) -> int:
        return 0

    def node_slots(self, *, nodes: int, spares: int, excluded: Collection[str]) -> list[str] | None:
        usable = [f"n{i}" for i in range(nodes + spares) if f"n{i}" not in excluded]
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
    ) -> SimTelemetry:
        gang = self.world.gang
        if gang is None or gang.attempt != attempt:
            raise ValueError(f"attempt {attempt}: no simulated gang")
        return SimTelemetry(gang)
