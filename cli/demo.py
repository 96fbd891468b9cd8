"""`vlctl demo`: the whole product in a few minutes on this machine.

It trains the mini Qwen2-VL on synthetic grounding and video data as a job of 2 local nodes under the
controller, with checkpoints and in-place recovery (a hot spare node waits beside the job); kills a rank partway
(SIGKILL from outside) and lets the controller replace it in place: the other rank keeps its process and goes
back to the newest in-memory snapshot, the spare takes the lost rank's state from its peer's replica; slows one
rank 1.5x from a later step (the trainer's fault hook) and lets the straggler detector flag it; then prints a
summary: the loss curve, what the model answers on held-out images and videos against the truth, the recovery
(its phases, the steps done again, the survivor's pid before and after), the straggler found, ETTR, and where
the metrics are.

Everything lives under OUT (default runs/demo): data, run folder, logs, and its own SQLite store, so the demo
never touches the user's job history. Inspect it afterwards with
`VLCTL_DATABASE_URL=sqlite:///OUT/vlctl.db vlctl status demo` (and events, logs, checkpoints, stragglers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from controller.spec import parse_spec
from controller.store import migrate
from controller.store.repo import create_job, get_job, list_attempts, list_events
from controller.store.session import StoreConfig, open_store
from controller.views import JobView
from trainer.contract.telemetry import (
    ENV_FAULT_RANK,
    ENV_FAULT_SLOW_FACTOR,
    ENV_FAULT_SLOW_FROM_STEP,
)

from .errors import EXIT_FAILURE, CliError
from .output import stderr, stdout

JOB = "demo"
STEPS = 80
UI_PORT = 8470  # vlctl ui's default
INTERVAL = 10
KILL_AT_STEP = 14  # after the checkpoint at step 10: in place, at most one step is done again
# The straggler detector learns each rank's own speed over 3 windows after the warm-up (steps 3..32, and the
# recovery's window is not judged), so the slowdown starts after them: a rank slow from the start has no
# healthy baseline.
SLOW_FROM_STEP = 45
SLOW_FACTOR = 1.5
SLOW_RANK = 1
KILL_RANK = 1


def demo_spec(data: Path, run_dir: Path) -> dict[str, Any]:
    train = data / "train"
    return {
        "name": JOB,
        "backend": "local",
        "resources": {"nodes": 2, "procs_per_node": 1},
        "training": {
            "run_dir": str(run_dir),
            "model": {"name": "mini"},
            "data": {
                "paths": [str(train / "grounding.jsonl"), str(train / "video_qa.jsonl")],
                "row_len": 256,
                "rows_per_step": 4,
                "micro_batch_rows": 1,
                "num_workers": 0,
                "cache_dir": str(data / "cache"),
            },
            "parallel": {"dp": 2},
            "training": {"stage": 2, "steps": STEPS, "lr": 3.0e-3, "warmup_steps": 5, "grad_clip": 1.0},
            "checkpoint": {"interval_steps": INTERVAL, "keep_last": 3},
        },
        "checkpoint_policy": {"interval": INTERVAL, "min_interval_steps": 1},
        "fault_tolerance": {
            "recovery": "in-place",
            "hot_spares": 1,
            "max_restarts": 3,
            "backoff_base_seconds": 1,
            "backoff_max_seconds": 5,
            "hang_timeout_seconds": 120,
            "startup_timeout_seconds": 600,
        },
        # Windows of 10 steps: one checkpoint step (not judged) leaves 9 samples, above the 5 a window needs.
        "stragglers": {"action": "report", "window": 10, "warmup_steps": 3, "persistence": 2},
    }


class Chaos:
    """Kills rank KILL_RANK once the job passes KILL_AT_STEP (in the first attempt only)."""

    def __init__(self) -> None:
        self.killed_at: float | None = None
        self.killed_pid: int | None = None
        self.survivors: dict[int, int] = {}  # rank -> pid, just before the kill
        self.pids_after: dict[int, int] = {}  # rank -> pid, each as last seen while the job ran after it

    def __call__(self, snapshot: JobView) -> None:
        if self.killed_at is not None:
            if str(snapshot.phase) == "running":
                # Per rank: at the end a rank whose process has finished shows no pid while another's still
                # does, and a survivor would read as replaced.
                self.pids_after.update({r.rank: r.pid for r in snapshot.ranks or () if r.pid})
            return
        if snapshot.attempt != 1 or (snapshot.step or 0) < KILL_AT_STEP:
            return
        pid = next((r.pid for r in snapshot.ranks or () if r.rank == KILL_RANK and r.pid), None)
        if pid is None:
            return
        self.survivors = {r.rank: r.pid for r in snapshot.ranks or () if r.rank != KILL_RANK and r.pid}
        os.kill(pid, signal.SIGKILL)
        self.killed_at, self.killed_pid = time.time(), pid
        stderr.print(
            f"[demo] step {snapshot.step}: SIGKILL to rank {KILL_RANK} (pid {pid}); the controller takes it "
            "from here",
            highlight=False,
            markup=False,
        )


def run_demo(out: str, *, keep: bool = False) -> None:
    from controller.metrics import serve_metrics

    from .control import supervise

    root = Path(out).resolve()
    if root.exists() and not keep:
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data, run_dir = root / "data", root / "run"
    stderr.print(f"[demo] synthetic grounding and video data in {data}", highlight=False, markup=False)
    # In a child process: the CLI imports only the trainer's contract (its data code pulls in torch).
    made = subprocess.run(
        [sys.executable, "-m", "trainer.data.synthetic", str(data), "--seed", "0"]
        + ["--num-images", "120", "--num-videos", "24", "--num-texts", "0"],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise CliError(f"demo: making the synthetic data failed: {made.stderr.strip()[-300:]}", EXIT_FAILURE)
    url = f"sqlite:///{root / 'vlctl.db'}"
    db = open_store(StoreConfig(url=url))
    migrate.upgrade(db)
    spec = parse_spec(demo_spec(data, run_dir))
    with db.transaction() as session:
        create_job(session=session, name=JOB, spec=spec.model_dump(mode="json"))
    server, _ = serve_metrics(db, "127.0.0.1", 0)
    metrics_url = f"http://127.0.0.1:{server.server_port}/metrics"
    ui = _dashboard(db)
    stderr.print(
        f"[demo] job {JOB!r}: 2 local nodes x 1 rank, {STEPS} steps, a checkpoint every {INTERVAL}; "
        f"rank {KILL_RANK} is killed at step {KILL_AT_STEP}, rank {SLOW_RANK} runs {SLOW_FACTOR}x slower from "
        f"step {SLOW_FROM_STEP}; controller metrics on {metrics_url}",
        highlight=False,
        markup=False,
    )
    stderr.print(
        f"[demo] watch it live: the dashboard is on {ui.url}jobs/{JOB} until the demo ends (`vlctl ui` after it)",
        highlight=False,
        markup=False,
    )
    chaos = Chaos()
    env = {
        ENV_FAULT_SLOW_FROM_STEP: str(SLOW_FROM_STEP),
        ENV_FAULT_SLOW_FACTOR: str(SLOW_FACTOR),
        ENV_FAULT_RANK: str(SLOW_RANK),
    }
    try:
        phase = supervise(
            db,
            JOB,
            poll_seconds=0.5,
            runs_root=root,
            live=sys.stderr.isatty(),
            controller_id="demo-controller",
            on_pass=chaos,
            env=env,
            progress=None if sys.stderr.isatty() else _progress_printer(),
        )
        summary = _summary(db, run_dir, data, chaos, metrics_url, started)
    finally:
        server.shutdown()
        ui.stop()
        db.dispose()
    _print_summary(summary)
    stdout.print(
        f"\nEverything is in {root}. Look around with:\n"
        f"  export VLCTL_DATABASE_URL={url}\n"
        f"  vlctl status {JOB}; vlctl events {JOB}; vlctl stragglers {JOB}; vlctl checkpoints {JOB}; "
        f"vlctl logs {JOB} --rank 1; vlctl ui (this job's page: http://127.0.0.1:{UI_PORT}/jobs/{JOB})",
        highlight=False,
    )
    if str(phase) != "succeeded":
        raise CliError(f"demo: the job ended {phase}; see `vlctl events {JOB}` as above", EXIT_FAILURE)


def _dashboard(db):
    """`vlctl ui` for the demo's store, on its usual port when free (the URL stays the same from run to run)."""
    from controller.dashboard import DashboardServer

    try:
        server = DashboardServer(db, port=UI_PORT)
    except OSError:
        server = DashboardServer(db, port=0)
    return server.start()


def _progress_printer():
    """Without a terminal (CI, a pipe): one line per 10 steps instead of the live view."""
    last = [-1]

    def show(snapshot: JobView) -> None:
        step = snapshot.step or 0
        if step // 10 != last[0] // 10 or step < last[0]:
            last[0] = step
            loss = "-" if snapshot.loss is None else f"{snapshot.loss:.3f}"
            flagged = [r.rank for r in snapshot.ranks or () if r.flagged]
            stderr.print(
                f"[demo] {snapshot.phase} attempt {snapshot.attempt} step {step}/{STEPS} loss {loss} "
                f"restarts {snapshot.restarts}" + (f" stragglers {flagged}" if flagged else ""),
                highlight=False,
                markup=False,
            )

    return show


def _summary(db, run_dir: Path, data: Path, chaos: Chaos, metrics_url: str, started: float) -> dict[str, Any]:
    with db.read() as session:
        job = get_job(session=session, name=JOB)
        attempts = list_attempts(session=session, job_id=job.id)
        events = list_events(session=session, job_id=job.id)
        summary: dict[str, Any] = {
            "phase": str(job.phase),
            "steps": job.current_step,
            "restarts": job.num_restarts,
            "ettr": job.ettr,
            "lost_seconds": dict(job.lost_seconds or {}),
            "productive_seconds": job.productive_seconds,
            "attempts": [
                {
                    "number": a.number,
                    "exit_class": a.exit_class,
                    "resumed_from_step": a.resumed_from_step,
                    "last_step": a.last_step,
                }
                for a in attempts
            ],
            "failures": [e.message for e in events if e.type == "Failure"],
            "failure_noticed_at": next((e.time.timestamp() for e in events if e.type == "Failure"), None),
            "stragglers": [e.data for e in events if e.reason == "StragglerFlagged"],
            "detection_seconds": next(
                (e.data.get("detection_seconds") for e in events if e.type == "Failure" and e.data), None
            ),
            "killed_at": chaos.killed_at,
            "recovery": _in_place_recovery(events, chaos, run_dir),
            "metrics_url": metrics_url,
            "ranks_metrics": sorted(str(p) for p in run_dir.glob("metrics-rank*.jsonl")),
        }
    summary["loss_curve"] = _loss_curve(run_dir / "metrics-rank0.jsonl")
    summary["answers"] = _answers(run_dir, data)
    summary["elapsed_seconds"] = time.time() - started
    return summary


def _in_place_recovery(events, chaos: Chaos, run_dir: Path) -> dict[str, Any] | None:
    """The in-place recovery of the killed rank, as the events and the ranks' records tell it; None if none."""
    started = next((e for e in events if e.reason == "InPlaceRecoveryStarted"), None)
    done = next((e for e in events if e.reason == "RecoveredInPlace"), None)
    if started is None or done is None:
        return None
    resumed_at = done.data.get("resumed_at")
    steps = [
        json.loads(line)
        for line in (run_dir / "metrics-rank0.jsonl").read_text().splitlines()
        if '"step_seconds"' in line
    ]
    first = next((x["time"] for x in steps if resumed_at is not None and x["time"] > resumed_at), None)
    pids = chaos.pids_after
    return {
        "spare": started.data.get("spare"),
        "decided_after": None if chaos.killed_at is None else started.time.timestamp() - chaos.killed_at,
        "step": done.data.get("step"),
        "detect": done.data.get("detect_seconds"),
        "regroup": done.data.get("regroup_seconds"),
        "restore": done.data.get("restore_seconds"),
        "first_step": None if first is None or resumed_at is None else first - resumed_at,
        "total": None if first is None or chaos.killed_at is None else first - chaos.killed_at,
        "steps_lost": done.data.get("steps_lost"),
        "survivors": {rank: (pid, pids.get(rank)) for rank, pid in chaos.survivors.items()},
    }


def _loss_curve(path: Path) -> dict[int, float]:
    losses: dict[int, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "step_seconds" in record and record.get("loss") is not None:
            losses[record["step"] + 1] = record["loss"]  # the last record of a step wins (a resume repeats)
    return dict(sorted(losses.items()))


def _answers(run_dir: Path, data: Path) -> dict[str, Any]:
    """Greedy answers of the final checkpoint to held-out questions, in a child process (it loads torch)."""
    answers = run_dir / "demo-answers.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.evaluate",
            str(run_dir),
            "--data",
            str(data / "val" / "grounding.jsonl"),
            str(data / "val" / "video_qa.jsonl"),
            "--max-samples",
            "6",
            "--answers",
            str(answers),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "evaluation failed"}
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    return {"report": json.loads(proc.stdout), "rows": rows}


def _sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in values)


def _print_summary(s: dict[str, Any]) -> None:
    out = stdout
    out.rule("vlctl demo: summary")
    curve = s["loss_curve"]
    if curve:
        steps = list(curve)
        sample = [curve[k] for k in steps[:: max(1, len(steps) // 40)]]
        out.print(
            f"loss: {curve[steps[0]]:.2f} at step {steps[0]} -> {curve[steps[-1]]:.3f} at step {steps[-1]}  "
            f"{_sparkline(sample)}",
            highlight=False,
        )
    out.print(
        f"job ended {s['phase']} after {s['steps']} steps, {s['restarts']} restart(s), in "
        f"{s['elapsed_seconds']:.0f} s",
        highlight=False,
    )
    for a in s["attempts"]:
        resumed = (
            f"resumed from the checkpoint at step {a['resumed_from_step']}"
            if a["resumed_from_step"]
            else "from scratch"
        )
        out.print(
            f"  attempt {a['number']}: {resumed}, reached step {a['last_step']}, ended {a['exit_class']}"
        )
    if (r := s["recovery"]) is not None:
        kept = [f"rank {rank} pid {a}" for rank, (a, b) in r["survivors"].items() if a == b]
        moved = [f"rank {rank} pid {a} -> {b}" for rank, (a, b) in r["survivors"].items() if a != b]

        def secs(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f} s"

        out.print(
            f"recovery in place: rank {KILL_RANK} killed, its node given to spare {r['spare']} "
            f"{secs(r['decided_after'])} later; every rank back at step {r['step']} from memory (regroup "
            f"{secs(r['regroup'])}, restore {secs(r['restore'])}, then the first step {secs(r['first_step'])}): "
            f"training again {secs(r['total'])} after the kill, {r['steps_lost']} completed step(s) done again",
            highlight=False,
        )
        out.print(
            "  the survivors kept running: "
            + (", ".join(kept) or "none")
            + (f"; restarted: {', '.join(moved)}" if moved else ""),
            highlight=False,
        )
    if s["failures"]:
        latency = None
        if s["killed_at"] is not None and s["failure_noticed_at"] is not None:
            latency = s["failure_noticed_at"] - s["killed_at"]
        out.print(
            f"failure: {s['failures'][0]}"
            + (f" (noticed {latency:.1f} s after the rank died)" if latency is not None else ""),
            highlight=False,
        )
    if s["stragglers"]:
        d = s["stragglers"][0]
        out.print(
            f"straggler: rank {d['rank']} on {d['node']}, {d['slowdown']:.2f}x the other ranks' own work "
            f"(cause {d['cause']}, phase {d['phase']}), flagged at step {d['step'] + 1}",
            highlight=False,
        )
    else:
        out.print("straggler: none flagged", highlight=False)
    lost = ", ".join(f"{k} {v:.0f} s" for k, v in s["lost_seconds"].items() if v >= 0.5)
    ettr = "-" if s["ettr"] is None else f"{s['ettr']:.0%}"
    out.print(
        f"ETTR {ettr} (productive {s['productive_seconds']:.0f} s; lost: {lost or 'none'})", highlight=False
    )
    answers = s["answers"]
    if "error" in answers:
        out.print(f"answers: evaluation failed: {answers['error']}", highlight=False)
    else:
        table = Table(title="held-out questions: the model's answer against the truth")
        for column in ("task", "answer", "truth", "score"):
            table.add_column(column)
        for r in answers["rows"]:
            score = f"IoU {r['iou']:.2f}" if r.get("iou") is not None else ("right" if r["hit"] else "wrong")
            table.add_row(r["task"], r["answer"][:60], str(r["truth"]), score)
        out.print(table)
        rep = answers["report"]
        for task in ("grounding", "direction"):
            t = rep.get(task) or {}
            if t.get("n"):
                out.print(
                    f"{task}: {t['hits']}/{t['n']} right (chance {t['chance']:.2f}) on this small sample",
                    highlight=False,
                )
        out.print(
            f"{STEPS} steps are far too few to learn these tasks; `make learn` trains video direction from "
            "scratch to about 0.9 right in some 8 minutes (docs/learning.md)",
            highlight=False,
        )
    out.print(
        f"metrics: controller {s['metrics_url']} (while the demo runs); per rank: {', '.join(s['ranks_metrics'])}"
    )
