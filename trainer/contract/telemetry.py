"""Per-rank training telemetry: what every training process exports, and how the control plane reads it back.

Every rank serves one Prometheus text endpoint and appends a JSONL line per step to its run folder. Both carry
the metrics listed in `METRICS`; the controller, the alert rules and the dashboards are checked against that list.

Decisions:

- Labels are `training_job`, `node`, `rank`, `local_rank` on every series. Never `job` or `instance`: Prometheus
  sets those itself at scrape time, and a target's own would be renamed to `exported_job`.
- Phase and checkpoint times are one metric each with an extra label (`phase`, `operation`), so a dashboard can
  stack them; each value is the last step's (the last checkpoint's), in seconds.
- The straggler signal is `own_work_seconds`, not `step_seconds`: in synchronous data-parallel training the
  collectives make every rank's step as long as the slowest rank's, so wall times are equal by construction.
  Own work is data + forward + backward + optimizer, with time blocked in collectives taken out of each.
  `sync_wait_seconds` is the wait at the explicit sync point after compute: the time a rank waited for the
  slowest one (long on fast ranks, about zero on the straggler). It is part of `collective_wait`.
- Hang signal: `last_progress_timestamp_seconds` moves only when the rank completes a step or a micro-step, and
  is absent until the first one (so start-up is told apart by `process_start_time_seconds` instead). The HTTP
  endpoint keeps answering while the training thread is stuck, so "scrapable but stale" means hung.
- Counters (`..._total`) are running totals in Prometheus. In a sink's metrics dict and in the JSONL line the
  same metric appears under its `key` (the name without prefix and `_total`) as this step's increment.
- `checkpoint_storage_outage_seconds` is set with every step (0 while saves commit), so an alert on it has
  data before any outage: it grows while the checkpoint storage cannot be written and training goes on.
- The parser returns unset metrics as None (the exporter omits them rather than inventing zeros).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

PREFIX = "vlctl_trainer_"

LABEL_TRAINING_JOB = "training_job"
LABEL_NODE = "node"
LABEL_RANK = "rank"
LABEL_LOCAL_RANK = "local_rank"
RANK_LABELS = (LABEL_TRAINING_JOB, LABEL_NODE, LABEL_RANK, LABEL_LOCAL_RANK)
RESERVED_LABELS = ("job", "instance")  # set by Prometheus at scrape time; never exported by a target

PHASE_LABEL = "phase"
OWN_WORK_PHASES = ("data", "forward", "backward", "optimizer")
PHASES = (*OWN_WORK_PHASES, "collective_wait")
CHECKPOINT_LABEL = "operation"
CHECKPOINT_OPERATIONS = ("stage", "save", "load")  # stage: copy to host memory before an asynchronous save

# Files in the run folder, per global rank.
# One JSON object per line, {"step", "time", <key>: value, ...}: a line per step (it has "step_seconds") and
# one per checkpoint operation; null stands for a non-finite value.
JSONL_FILE = "metrics-rank{rank}.jsonl"
ENDPOINT_FILE = "metrics-rank{rank}.endpoint.json"  # {"host", "port", "url", "pid"}, written once serving

# Environment the launcher sets for each rank (RANK, LOCAL_RANK come from torchrun).
ENV_TRAINING_JOB = "VLCTL_TRAINING_JOB"
ENV_NODE = "VLCTL_NODE"  # defaults to the host name
# The launcher's attempt number (1, 2, ...; unset: 0, a run outside the controller). Every JSONL line and the
# endpoint file carry it as "attempt", so a reader tells a restarted gang's lines from its predecessor's.
ENV_ATTEMPT = "VLCTL_ATTEMPT"
ENV_METRICS_HOST = "VLCTL_METRICS_HOST"
ENV_METRICS_PORT = "VLCTL_METRICS_PORT"  # 0 picks a free port, reported in ENDPOINT_FILE
ENV_METRICS_BASE_PORT = "VLCTL_METRICS_BASE_PORT"  # rank serves on base + LOCAL_RANK

# Fault injection, read by trainer.faults (for chaos tests of the controller).
# In-place recovery (trainer/recovery/): the job's recovery store, and a spare's member id (set only for a spare,
# which learns its rank from its assignment instead of RANK)
ENV_RECOVERY_STORE = "VLCTL_RECOVERY_STORE"  # host:port of the coordinator's TCPStore
ENV_RECOVERY_MEMBER = "VLCTL_RECOVERY_MEMBER"
# The attempt's log folder (set by the launcher's rank_exec). A rank that ends on purpose (any exit code the
# trainer returns) leaves `exit-<pid>` there holding the code: a rank process gone without one died (killed,
# crashed), which the launcher may act on before torchrun reports it. A spare given a rank continues its log in
# that rank's `rank-<N>.log`.
ENV_LOG_DIR = "VLCTL_LOG_DIR"

ENV_FAULT_CRASH_AT_STEP = "VLCTL_FAULT_CRASH_AT_STEP"
ENV_FAULT_CRASH_MODE = "VLCTL_FAULT_CRASH_MODE"  # exit (default) | raise | kill
ENV_FAULT_CRASH_IN = "VLCTL_FAULT_CRASH_IN"  # step (default), snapshot, restore: comma-separated
ENV_FAULT_HANG_AT_STEP = "VLCTL_FAULT_HANG_AT_STEP"
ENV_FAULT_SLOW_FACTOR = "VLCTL_FAULT_SLOW_FACTOR"
ENV_FAULT_SLOW_FROM_STEP = "VLCTL_FAULT_SLOW_FROM_STEP"
ENV_FAULT_RANK = "VLCTL_FAULT_RANK"  # unset: every rank
ENV_FAULT_ONCE_DIR = "VLCTL_FAULT_ONCE_DIR"  # a fault fires once per job: markers in this folder

# Exit codes of a training process (besides 0, 1 for an unhandled error and 128+N when killed by signal N).
EXIT_PREEMPTED = 75  # stopped on SIGTERM after finishing its step (and saving, if configured); resume it
EXIT_FAULT_CRASH = 97  # the injected crash (crash mode "exit"): os._exit, no cleanup, like a hard failure
# The checkpoint storage stayed unwritable for checkpoint.storage_outage_seconds while training went on (74 is
# sysexits' EX_IOERR). Every rank's last log line then starts with STORAGE_UNAVAILABLE and names the path.
EXIT_STORAGE_UNAVAILABLE = 74
STORAGE_UNAVAILABLE = "checkpoint storage unavailable"
# In-place recovery found the state of some rank in no memory (a rank and the peer keeping its replica both lost):
# the job goes on from the newest disk checkpoint, as after any other failure.
EXIT_RECOVERY_FALLBACK = 76

MetricKind = Literal["gauge", "counter"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # exposed sample name
    kind: MetricKind
    unit: str  # seconds, unix_seconds, tokens, steps, nats, ratio, count
    help: str
    label: str | None = None  # extra label besides RANK_LABELS
    label_values: tuple[str, ...] = ()

    @property
    def field(self) -> str:
        """Attribute of `RankSample` that holds it."""
        return self.name.removeprefix(PREFIX)

    @property
    def key(self) -> str:
        """Key in a sink's metrics dict and in the JSONL line; labelled metrics use `key/label_value`."""
        return self.field.removesuffix("_total") if self.kind == "counter" else self.field

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f"{self.key}/{v}" for v in self.label_values) if self.label else (self.key,)

    @property
    def labels(self) -> tuple[str, ...]:
        return (*RANK_LABELS, self.label) if self.label else RANK_LABELS


def _m(name: str, kind: MetricKind, unit: str, help: str, label: str | None = None, values=()) -> MetricSpec:
    return MetricSpec(name=PREFIX + name, kind=kind, unit=unit, help=help, label=label, label_values=values)


METRICS: tuple[MetricSpec, ...] = (
    _m("step", "gauge", "steps", "Index of the last completed optimizer step."),
    _m(
        "step_seconds",
        "gauge",
        "seconds",
        "Wall time of the last step (equal on all ranks of a synchronous job).",
    ),
    _m("phase_seconds", "gauge", "seconds", "Time of the last step by phase.", PHASE_LABEL, PHASES),
    _m(
        "own_work_seconds",
        "gauge",
        "seconds",
        "Last step's data+forward+backward+optimizer, collectives excluded.",
    ),
    _m("sync_wait_seconds", "gauge", "seconds", "Last step's wait at the sync point for the slowest rank."),
    _m("loss", "gauge", "nats", "Training loss of the last step on this rank."),
    _m("mfu", "gauge", "ratio", "Model FLOPs utilisation estimate of the last step (0..1)."),
    _m("text_tokens_total", "counter", "tokens", "Text tokens processed (padding excluded)."),
    _m("vision_tokens_total", "counter", "tokens", "Vision tokens (merged patches) processed."),
    _m("micro_steps_total", "counter", "count", "Micro-steps (forward+backward passes) completed."),
    _m(
        "checkpoint_seconds",
        "gauge",
        "seconds",
        "Duration of the last checkpoint operation.",
        CHECKPOINT_LABEL,
        CHECKPOINT_OPERATIONS,
    ),
    _m(
        "checkpoint_storage_outage_seconds",
        "gauge",
        "seconds",
        "Time since the first failed save of the current checkpoint storage outage; 0 while saves commit.",
    ),
    _m(
        "last_progress_timestamp_seconds",
        "gauge",
        "unix_seconds",
        "Unix time of the last completed step or micro-step.",
    ),
    _m("process_start_time_seconds", "gauge", "unix_seconds", "Unix time the rank's process started."),
    _m("pid", "gauge", "count", "Process id of the rank."),
)
METRICS_BY_NAME = {m.name: m for m in METRICS}
METRICS_BY_KEY = {m.key: m for m in METRICS}


@dataclass(kw_only=True, slots=True)
class RankLabels:
    training_job: str
    node: str
    rank: int
    local_rank: int

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank: must be >= 0, got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"local_rank: must be >= 0, got {self.local_rank}")

    def as_dict(self) -> dict[str, str]:
        return {
            LABEL_TRAINING_JOB: self.training_job,
            LABEL_NODE: self.node,
            LABEL_RANK: str(self.rank),
            LABEL_LOCAL_RANK: str(self.local_rank),
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, hostname: str) -> RankLabels:
        """From torchrun's RANK/LOCAL_RANK and the launcher's VLCTL_* variables (a lone process is rank 0)."""
        values = {}
        for name in ("RANK", "LOCAL_RANK"):
            raw = environ.get(name, "0")
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"{name}: expected an integer, got {raw!r}") from None
        return cls(
            training_job=environ.get(ENV_TRAINING_JOB, "local"),
            node=environ.get(ENV_NODE) or hostname,
            rank=values["RANK"],
            local_rank=values["LOCAL_RANK"],
        )


@dataclass(kw_only=True, slots=True)
class RankSample:
    """One rank's values from one scrape; None where the rank has not reported the metric yet."""

    training_job: str
    node: str
    rank: int
    local_rank: int
    step: int | None = None
    step_seconds: float | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    own_work_seconds: float | None = None
    sync_wait_seconds: float | None = None
    loss: float | None = None
    mfu: float | None = None
    text_tokens_total: float | None = None
    vision_tokens_total: float | None = None
    micro_steps_total: float | None = None
    checkpoint_seconds: dict[str, float] = field(default_factory=dict)
    checkpoint_storage_outage_seconds: float | None = None
    last_progress_timestamp_seconds: float | None = None
    process_start_time_seconds: float | None = None
    pid: int | None = None

    def seconds_since_progress(self, now: float) -> float | None:
        """None before the first step or micro-step (use process_start_time_seconds for a start-up timeout)."""
        t = self.last_progress_timestamp_seconds
        return None if t is None else max(0.0, now - t)


_INT_FIELDS = ("step", "pid")


# One sample line of the text format: name, the labels' text, the value (an optional timestamp after it).
_SAMPLE_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+\S+)?")
_LABEL_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"([^"]*)"\s*,?')


def parse_rank_metrics(text: str) -> list[RankSample]:
    """A Prometheus text exposition (one rank's endpoint, or several concatenated) -> one RankSample per rank,
    sorted by (training_job, rank). Series without the `vlctl_trainer_` prefix are ignored; a trainer series
    missing a rank label raises ValueError naming the metric.

    The trainer's own expositions (no escapes in a label value) are read line by line here: with
    prometheus_client's general parser an endpoint poll of 512 ranks cost the controller 2.2x the CPU
    (bench_controller_scale, `endpoints`). Anything with a backslash, or a line this reader does not take, goes
    to that parser whole."""
    if "\\" in text:
        return _parse_generic(text)
    series = []
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            foreign = line and not line.startswith("#") and not line.isspace()
            if foreign and _SAMPLE_LINE.fullmatch(line.strip()) is None:
                return _parse_generic(text)  # not a sample line as this reader knows them
            continue
        match = _SAMPLE_LINE.fullmatch(line.rstrip())
        if match is None:
            return _parse_generic(text)
        name, label_text, value = match.groups()
        labels = {}
        if label_text:
            pairs = _LABEL_PAIR.findall(label_text)
            if not pairs or _LABEL_PAIR.sub("", label_text).strip():
                return _parse_generic(text)
            labels = dict(pairs)
        try:
            series.append((name, labels, float(value)))
        except ValueError:
            return _parse_generic(text)
    return _rank_samples(series)


def _parse_generic(text: str) -> list[RankSample]:
    # Imported here: the CLI and the controller use this module's names without needing prometheus_client.
    from prometheus_client.parser import text_string_to_metric_families

    return _rank_samples(
        (s.name, s.labels, float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )


def _rank_samples(series: Iterable[tuple[str, Mapping[str, str], float]]) -> list[RankSample]:
    samples: dict[tuple[str, int], RankSample] = {}
    for name, labels, value in series:
        spec = METRICS_BY_NAME.get(name)
        if spec is None:
            continue
        missing = [label for label in spec.labels if label not in labels]
        if missing:
            raise ValueError(f"{name}: missing label(s) {', '.join(missing)}")
        rank_labels = RankLabels(
            training_job=labels[LABEL_TRAINING_JOB],
            node=labels[LABEL_NODE],
            rank=_label_int(name, labels, LABEL_RANK),
            local_rank=_label_int(name, labels, LABEL_LOCAL_RANK),
        )
        key = (rank_labels.training_job, rank_labels.rank)
        out = samples.get(key)
        if out is None:
            out = samples[key] = RankSample(
                training_job=rank_labels.training_job,
                node=rank_labels.node,
                rank=rank_labels.rank,
                local_rank=rank_labels.local_rank,
            )
        if spec.label:
            getattr(out, spec.field)[labels[spec.label]] = value
        elif spec.field in _INT_FIELDS and math.isfinite(value):
            setattr(out, spec.field, int(value))
        else:
            setattr(out, spec.field, value)
    return [samples[k] for k in sorted(samples)]


def _label_int(metric: str, labels: Mapping[str, str], name: str) -> int:
    try:
        return int(labels[name])
    except ValueError:
        raise ValueError(f"{metric}: label {name}={labels[name]!r} is not an integer") from None
