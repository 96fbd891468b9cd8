"""Synthetic ranks for the scale benchmark and its reduced-size tests: what N training processes would write
(JSONL step lines) or what a Prometheus server holds after scraping them (the instant vector of its query API),
without N processes.

Each rank's own work per step is 0.9 s x a job-wide factor of the step (the data mix: lognormal, `step_noise`)
x the rank's lognormal jitter (`noise`), one rank `slowdown` times slower; steps take 1 s of wall time, so step
s ends at t0 + s + 1. A rank's Prometheus target is scraped every `scrape_interval` seconds at its own offset
(Prometheus spreads targets over the interval), and a query at time t sees each rank's newest scrape.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from controller.ingest.prometheus import PrometheusTelemetry
from trainer.contract.telemetry import (
    LABEL_LOCAL_RANK,
    LABEL_NODE,
    LABEL_RANK,
    LABEL_TRAINING_JOB,
    OWN_WORK_PHASES,
    PHASE_LABEL,
)

PHASE_SHARE = {"data": 0.01, "forward": 0.35, "backward": 0.55, "optimizer": 0.09}
OWN_WORK = 0.9  # seconds per step of a typical rank; the step is 1 s
CACHED_STEPS = 4096  # steps whose own work is kept (a scrape looks back one interval)


@dataclass(kw_only=True)
class Fleet:
    num_ranks: int
    training_job: str = "scale"
    ranks_per_node: int = 8
    slow_rank: int | None = 5
    slowdown: float = 1.3
    noise: float = 0.03
    step_noise: float = 0.05
    seed: int = 0
    t0: float = 1_700_000_000.0
    _steps: OrderedDict[int, np.ndarray] = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        self.nodes = [f"node-{r // self.ranks_per_node}" for r in range(self.num_ranks)]

    def own_work(self, step: int) -> np.ndarray:
        """Every rank's own work at `step` (seconds), the same whenever asked."""
        cached = self._steps.get(step)
        if cached is None:
            rng = np.random.default_rng((self.seed, step))
            cached = (
                OWN_WORK
                * rng.lognormal(0.0, self.step_noise)
                * rng.lognormal(0.0, self.noise, self.num_ranks)
            )
            if self.slow_rank is not None:
                cached[self.slow_rank] *= self.slowdown
            self._steps[step] = cached
            while len(self._steps) > CACHED_STEPS:
                self._steps.popitem(last=False)
        return cached

    def step_end(self, step: int) -> float:
        return self.t0 + step + 1.0

    def jsonl_line(self, rank: int, step: int, *, attempt: int = 1) -> bytes:
        """The trainer's step line (trainer.contract.telemetry's keys) for `rank` at `step`."""
        own = float(self.own_work(step)[rank])
        t = self.step_end(step)
        record = {
            "step": step,
            "time": t,
            "attempt": attempt,
            "step_seconds": 1.0,
            "own_work_seconds": own,
            "sync_wait_seconds": max(0.0, 1.0 - own),
            **{f"phase_seconds/{p}": own * PHASE_SHARE[p] for p in OWN_WORK_PHASES},
            "phase_seconds/collective_wait": max(0.0, 1.0 - own),
            "text_tokens": 4096,
            "vision_tokens": 1024,
            "micro_steps": 4,
            "last_progress_timestamp_seconds": t,
            "loss": 2.0,
            "mfu": 0.4,
            "lr": 1e-4,
            "grad_norm": 1.0,
            "checkpoint_storage_outage_seconds": 0.0,
        }
        return (json.dumps(record) + "\n").encode()

    def scrape_offsets(self, scrape_interval: float) -> np.ndarray:
        return np.random.default_rng((self.seed, 1)).uniform(0.0, scrape_interval, self.num_ranks)

    def values(self, rank: int, step: int) -> tuple[dict[str, float], dict[str, float]]:
        """Rank `rank`'s metrics at the end of `step` as its endpoint exports them: each unlabelled metric's
        value under its `RankSample` field (counters as running totals), and the phase seconds by phase."""
        own = float(self.own_work(step)[rank])
        values = {
            "step": step,
            "step_seconds": 1.0,
            "own_work_seconds": own,
            "sync_wait_seconds": max(0.0, 1.0 - own),
            "loss": 2.0,
            "mfu": 0.4,
            "text_tokens_total": 4096.0 * (step + 1),
            "vision_tokens_total": 1024.0 * (step + 1),
            "micro_steps_total": 4.0 * (step + 1),
            "checkpoint_storage_outage_seconds": 0.0,
            "last_progress_timestamp_seconds": self.step_end(step),
            "process_start_time_seconds": self.t0 - 30.0,
            "pid": 1000.0 + rank,
        }
        phases = {
            **{p: own * PHASE_SHARE[p] for p in OWN_WORK_PHASES},
            "collective_wait": max(0.0, 1.0 - own),
        }
        return values, phases

    def instant_vector(self, now: float, scrape_interval: float) -> list[dict]:
        """The `result` of the Prometheus query API's instant vector at `now` for the controller's query
        (controller.ingest.prometheus.QUERIED): each rank's series as its newest scrape (at t0 + offset + k x
        scrape_interval <= now) saw them."""
        from controller.ingest.prometheus import QUERIED
        from trainer.contract.telemetry import METRICS

        queried = [spec for spec in METRICS if spec.name in QUERIED]
        offsets = self.scrape_offsets(scrape_interval)
        k = np.floor((now - self.t0 - offsets) / scrape_interval)
        scraped = self.t0 + offsets + k * scrape_interval
        completed = np.floor(scraped - self.t0).astype(np.int64) - 1  # step s ends at t0 + s + 1
        result = []
        for rank in map(int, np.flatnonzero(completed >= 0)):
            values, phases = self.values(rank, int(completed[rank]))
            at = float(scraped[rank])
            labels = {
                LABEL_TRAINING_JOB: self.training_job,
                LABEL_NODE: self.nodes[rank],
                LABEL_RANK: str(rank),
                LABEL_LOCAL_RANK: str(rank % self.ranks_per_node),
            }
            for spec in queried:
                if spec.label == PHASE_LABEL:
                    series = [({PHASE_LABEL: p}, v) for p, v in phases.items()]
                elif spec.field in values:
                    series = [({}, values[spec.field])]
                else:
                    continue  # no value (a checkpoint's seconds before any checkpoint): not exported
                result += [
                    {
                        "metric": {"__name__": spec.name, **labels, **extra},
                        "value": [at, "NaN" if math.isnan(v) else repr(float(v))],
                    }
                    for extra, v in series
                ]
        return result


class FleetPrometheus(PrometheusTelemetry):
    """PrometheusTelemetry whose query answer is the fleet's instant vector at `now` (set by `prepare`), as the
    JSON text the HTTP API sends, parsed as the source parses it: no server holds 16,384 ranks' series here, and
    polls 15 s apart for half an hour must not take half an hour."""

    def __init__(self, fleet: Fleet, scrape_interval: float, **kw: Any):
        super().__init__("http://prometheus.invalid:9090", fleet.training_job, 1, fleet.num_ranks, **kw)
        self.fleet, self.scrape_interval, self.now, self.body = fleet, scrape_interval, fleet.t0, b""

    def prepare(self, now: float) -> None:
        self.now = now
        result = self.fleet.instant_vector(now, self.scrape_interval)
        self.body = json.dumps(
            {"status": "success", "data": {"resultType": "vector", "result": result}}
        ).encode()

    def fetch(self) -> list[dict]:
        return json.loads(self.body)["data"]["result"]


def write_lines(run_dir: str, num_ranks: int, seconds: int, start: float) -> None:
    """Be the ranks for `seconds` s: rank r appends its step-k line at start + k + (r % 10) / 10, so the lines
    arrive spread over each second as a real job's would (ranks do not finish a step in the same microsecond).
    Prints the writer's largest lag behind that schedule (its lines are late by that much, at most)."""
    import time
    from pathlib import Path

    fleet = Fleet(num_ranks=num_ranks, slow_rank=None, t0=start - 1.0)
    paths = [Path(run_dir) / f"metrics-rank{r}.jsonl" for r in range(num_ranks)]
    files = [open(p, "ab", buffering=0) for p in paths]  # noqa: SIM115
    lag = 0.0
    try:
        for step in range(seconds):
            for part in range(10):
                due = start + step + part / 10
                time.sleep(max(0.0, due - time.time()))
                for rank in range(part, num_ranks, 10):
                    files[rank].write(fleet.jsonl_line(rank, step))
                lag = max(lag, time.time() - due)
    finally:
        for f in files:
            f.close()
    print(json.dumps({"writer_max_lag_s": round(lag, 3)}))


def exposition(fleet: Fleet, rank: int, step: int) -> str:
    """Rank `rank`'s endpoint at the end of `step`, in the layout the trainer's exporter writes (HELP and TYPE
    lines, labels in sorted order), without building an exporter per rank."""
    from trainer.contract.telemetry import METRICS

    base = (
        f'local_rank="{rank % fleet.ranks_per_node}",node="{fleet.nodes[rank]}",rank="{rank}",'
        f'training_job="{fleet.training_job}"'
    )
    values, phases = fleet.values(rank, step)
    lines = []
    for spec in METRICS:
        if spec.field not in values and spec.label != PHASE_LABEL:
            continue
        lines += [f"# HELP {spec.name} {spec.help}", f"# TYPE {spec.name} {spec.kind}"]
        if spec.label == PHASE_LABEL:
            lines += [f'{spec.name}{{{base},{PHASE_LABEL}="{p}"}} {v!r}' for p, v in phases.items()]
        else:
            lines.append(f"{spec.name}{{{base}}} {float(values[spec.field])!r}")
    return "\n".join(lines) + "\n"


def serve(run_dir: str, num_ranks: int, attempt: int) -> None:
    """Be the ranks' endpoints: one HTTP server answering /rank/N with rank N's exposition at the step the
    clock is at (step s ends at t0 + s + 1, t0 = when it started), and an endpoint file per rank pointing there,
    as the trainer writes them. Serves until killed."""
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    from trainer.contract.telemetry import ENDPOINT_FILE

    fleet = Fleet(num_ranks=num_ranks, slow_rank=5, t0=time.time())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:  # noqa: N802 - the http.server interface
            rank = int(self.path.rsplit("/", 1)[-1])
            step = max(0, int(time.time() - fleet.t0) - 1)
            body = exposition(fleet, rank, step).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.request_queue_size = 1024
    port = server.server_port
    for rank in range(num_ranks):
        url = f"http://127.0.0.1:{port}/rank/{rank}"
        info = {"host": "127.0.0.1", "port": port, "url": url, "pid": 1000 + rank, "attempt": attempt}
        (Path(run_dir) / ENDPOINT_FILE.format(rank=rank)).write_text(json.dumps(info))
    print(json.dumps({"port": port}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        _, command, run_dir, ranks, seconds, start = sys.argv
        assert command == "write", command
        write_lines(run_dir, int(ranks), int(seconds), float(start))
