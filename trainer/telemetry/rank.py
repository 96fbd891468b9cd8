"""What the training loop holds: one rank's step timer, its sinks and its progress clock.

    telemetry = RankTelemetry.from_env(TelemetryConfig.from_env(os.environ), run_dir=run_dir)
    telemetry.start_step(step)
    with telemetry.timer.phase("data"): ...
    with telemetry.timer.phase("forward"): ...      # per micro-step, then telemetry.micro_step_done()
    stop = sync_point(telemetry.timer, flag=graceful.requested)
    with telemetry.timer.collective(): ...          # gradient all-reduce
    with telemetry.timer.phase("optimizer"): ...
    telemetry.end_step(loss=..., text_tokens=..., vision_tokens=..., mfu=...)

Decisions: the progress timestamp is refreshed by `micro_step_done` and `end_step` only, nothing else (a rank that
loops without finishing micro-steps is not making progress). The Prometheus endpoint starts in the constructor,
before the model is built, so the controller can watch start-up; its address goes to the log and, with a run
folder, to `metrics-rank{N}.endpoint.json` (written atomically). Rank 0 alone logs step lines and, with
`tensorboard`, writes TensorBoard event files (one writer per run, not one per rank: the loss, learning rate and
gradient norm are the whole job's, and per-rank times are the JSONL files' and Prometheus's job). The launcher's
attempt number (VLCTL_ATTEMPT) goes into every JSONL line and the endpoint file, since every attempt writes to
the same run folder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from trainer.contract.telemetry import (
    CHECKPOINT_OPERATIONS,
    ENDPOINT_FILE,
    ENV_ATTEMPT,
    ENV_METRICS_BASE_PORT,
    ENV_METRICS_HOST,
    ENV_METRICS_PORT,
    JSONL_FILE,
    RankLabels,
)

from .prometheus import PrometheusExporter, PrometheusSink
from .sinks import TENSORBOARD_DIR, JsonlSink, LoggingSink, MetricSink, TensorBoardSink
from .timers import StepTimer, StepTimes

log = logging.getLogger("trainer.telemetry")
_IMPORT_TIME = time.time()


@dataclass(kw_only=True, slots=True)
class TelemetryConfig:
    enabled: bool = True  # serve the Prometheus endpoint
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, reported in the endpoint file
    base_port: int | None = None  # serve on base_port + local_rank instead (several ranks per node)
    jsonl: bool = True  # metrics-rank{N}.jsonl in the run folder
    log_every: int = 1  # rank 0 logs a line every N steps; 0: never
    cuda_sync: bool | None = None  # StepTimer: None synchronises CUDA when it is in use
    tensorboard: bool = False  # rank 0 also writes TensorBoard event files under <run folder>/tensorboard/

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("telemetry.host: must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"telemetry.port: must be in 0..65535, got {self.port}")
        if self.base_port is not None:
            if not 1 <= self.base_port <= 65535:
                raise ValueError(f"telemetry.base_port: must be in 1..65535, got {self.base_port}")
            if self.port:
                raise ValueError("telemetry.base_port: set either port or base_port, not both")
        if self.log_every < 0:
            raise ValueError(f"telemetry.log_every: must be >= 0, got {self.log_every}")
        if not isinstance(self.tensorboard, bool):  # a string "false" would be truthy
            raise ValueError(f"telemetry.tensorboard: must be true or false, got {self.tensorboard!r}")

    def port_for(self, local_rank: int) -> int:
        if self.base_port is None:
            return self.port
        port = self.base_port + local_rank
        if port > 65535:
            raise ValueError(f"telemetry.base_port: {self.base_port} + local rank {local_rank} exceeds 65535")
        return port

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides) -> TelemetryConfig:
        """The launcher's VLCTL_METRICS_* variables over the defaults; `overrides` win over both."""
        values: dict = {}
        if ENV_METRICS_HOST in environ:
            values["host"] = environ[ENV_METRICS_HOST]
        for env, name in ((ENV_METRICS_PORT, "port"), (ENV_METRICS_BASE_PORT, "base_port")):
            if raw := environ.get(env):
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"{env}: expected a port number, got {raw!r}") from None
        return cls(**(values | overrides))


class RankTelemetry:
    def __init__(
        self,
        config: TelemetryConfig,
        labels: RankLabels,
        *,
        run_dir: Path | None = None,
        extra_sinks: Sequence[MetricSink] = (),
        attempt: int | None = None,
    ):
        """attempt: the launcher's attempt number, written into the JSONL lines and the endpoint file."""
        self.config = config
        self.labels = labels
        self.attempt = attempt
        self.timer = StepTimer(cuda_sync=config.cuda_sync)
        self.exporter: PrometheusExporter | None = None
        self.sinks: list[MetricSink] = []
        self._micro_steps = 0
        if config.enabled:
            static = {"pid": os.getpid(), "process_start_time_seconds": process_start_time()}
            port = config.port_for(labels.local_rank)
            self.exporter = PrometheusExporter(labels, host=config.host, port=port, static=static)
            self.sinks.append(PrometheusSink(self.exporter))
            log.info("rank %d serves metrics on %s", labels.rank, self.exporter.url)
            if run_dir is not None:
                path = Path(run_dir) / ENDPOINT_FILE.format(rank=labels.rank)
                _write_endpoint(path, self.exporter, attempt=attempt)
        if config.jsonl and run_dir is not None:
            path = Path(run_dir) / JSONL_FILE.format(rank=labels.rank)
            self.sinks.append(JsonlSink(path, attempt=attempt))
        if config.tensorboard and labels.rank == 0:
            if run_dir is None:
                log.warning("telemetry.tensorboard is ignored: no run folder to write event files in")
            else:
                self.sinks.append(TensorBoardSink(Path(run_dir) / TENSORBOARD_DIR))
        if config.log_every and labels.rank == 0:
            self.sinks.append(LoggingSink(every=config.log_every))
        self.sinks.extend(extra_sinks)

    @classmethod
    def from_env(
        cls, config: TelemetryConfig, *, run_dir: Path | None = None, environ: Mapping[str, str] = os.environ
    ) -> RankTelemetry:
        labels = RankLabels.from_env(environ, hostname=socket.gethostname())
        return cls(config, labels, run_dir=run_dir, attempt=attempt_from_env(environ))

    def start_step(self, step: int) -> None:
        self._micro_steps = 0
        self.timer.start_step(step)

    def abandon_step(self) -> None:
        """The step in flight ends unrecorded (in-place recovery goes back to a snapshot and does it again)."""
        self.timer.abandon_step()

    def micro_step_done(self) -> None:
        """Call after each micro-batch's backward: refreshes the progress timestamp between steps."""
        self._micro_steps += 1
        if self.exporter is not None:
            self.exporter.update({"last_progress_timestamp_seconds": time.time()})

    def end_step(
        self,
        *,
        loss: float | None = None,
        text_tokens: int = 0,
        vision_tokens: int = 0,
        mfu: float | None = None,
        extra: Mapping[str, float] | None = None,
    ) -> StepTimes:
        """Ends the timed step and logs it to every sink; `extra` adds keys of the loop's own (lr, grad_norm)."""
        times = self.timer.end_step()
        metrics = times.metrics()
        metrics.update(
            text_tokens=text_tokens,
            vision_tokens=vision_tokens,
            micro_steps=self._micro_steps,
            last_progress_timestamp_seconds=time.time(),
        )
        if loss is not None:
            metrics["loss"] = float(loss)
        if mfu is not None:
            metrics["mfu"] = float(mfu)
        metrics.update(extra or {})
        self.log(metrics, times.step)
        return times

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def log_checkpoint(self, operation: str, seconds: float, step: int) -> None:
        if operation not in CHECKPOINT_OPERATIONS:
            raise ValueError(
                f"operation: expected one of {', '.join(CHECKPOINT_OPERATIONS)}, got {operation!r}"
            )
        self.log({f"checkpoint_seconds/{operation}": seconds}, step)

    @contextmanager
    def time_checkpoint(self, operation: str, step: int) -> Iterator[None]:
        """Times the block and logs it as the checkpoint operation's duration (only when it succeeds)."""
        start = time.perf_counter()
        yield
        self.log_checkpoint(operation, time.perf_counter() - start, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def attempt_from_env(environ: Mapping[str, str]) -> int | None:
    """The launcher's attempt number; None when not launched by the controller."""
    raw = environ.get(ENV_ATTEMPT)
    if not raw:
        return None
    try:
        attempt = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_ATTEMPT}: expected an integer, got {raw!r}") from None
    if attempt < 0:
        raise ValueError(f"{ENV_ATTEMPT}: must be >= 0, got {attempt}")
    return attempt


def _write_endpoint(path: Path, exporter: PrometheusExporter, *, attempt: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    info = {"host": exporter.host, "port": exporter.port, "url": exporter.url, "pid": os.getpid()}
    if attempt is not None:
        info["attempt"] = attempt
    tmp.write_text(json.dumps(info) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file


def process_start_time() -> float:
    """Unix time this process started, from /proc (boot time + start ticks; about 1 s resolution); elsewhere,
    the time this module was imported."""
    try:
        after_comm = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        ticks = int(after_comm[19])  # field 22, starttime; the list starts at field 3
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORT_TIME
