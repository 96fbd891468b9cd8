"""Where a rank's step metrics go: the sink interface, the per-rank JSONL file and the log line.

A sink takes `log(metrics, step)` and `close()`, nothing else, so the training loop hands one dict to a list of
sinks and never knows which are there. The dict uses the contract's keys (`trainer.contract.telemetry`): plain
keys for plain metrics, `key/label_value` for labelled ones (`phase_seconds/forward`), and a counter's key holds
this step's increment. Keys outside the contract (a learning rate, a gradient norm) are allowed: the JSONL file
and the log keep them, the Prometheus sink skips them.

JSONL decisions: one JSON object per `log` call ({"step", "time", ...}), so one line per step plus a line per
checkpoint operation; appended and flushed per line, so a reader tailing the file (the local backend's
controller) sees each step as it ends and a crash loses nothing written. Non-finite numbers (a NaN loss) are
written as null, keeping the file strict JSON. Every attempt of a job appends to the same file, so a sink given
the launcher's attempt number writes it as "attempt" in every line: the reader ignores a previous attempt's
late lines by it.

TensorBoard decisions (`TensorBoardSink`, global rank 0 only, with `telemetry.tensorboard: true`): event files
under `<run folder>/tensorboard/`, written by torch's `SummaryWriter` (imported when the sink first writes, so a
run without it never pays the import); see the class for the tags, the step axis and resumes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("trainer.telemetry")

TENSORBOARD_DIR = "tensorboard"  # under the run folder: `tensorboard --logdir <run folder>/tensorboard`
# JSONL key -> TensorBoard tag; tokens per second is derived (see TensorBoardSink).
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "mfu": "train/mfu",
}
TOKENS_PER_SECOND_TAG = "train/tokens_per_second"


@runtime_checkable
class MetricSink(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: Path, *, attempt: int | None = None):
        self.path = Path(path)
        self.attempt = attempt
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.path}: sink is closed")
        record = {"step": step, "time": time.time()}
        if self.attempt is not None:
            record["attempt"] = self.attempt
        record.update({k: _finite_or_none(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: Path) -> list[dict]:
    """The lines written so far; a last line cut short by a crash mid-write is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _finite_or_none(value: float) -> float | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class TensorBoardSink:
    """Loss, learning rate, gradient norm, tokens per second and MFU of each step as TensorBoard scalars, in event
    files under `log_dir` (the runtime passes `<run folder>/tensorboard`).

    Tags: `train/loss`, `train/learning_rate`, `train/grad_norm`, `train/tokens_per_second` (this rank's text
    and vision tokens over the step's wall time, as the log line shows: one data-parallel replica's throughput)
    and `train/mfu`. The step axis is the step the JSONL lines carry. A value the JSONL file writes as null
    (NaN, infinite) or does not have is left out of that step rather than written as NaN; a line with none of
    them (a checkpoint timing) writes nothing. TensorBoard stores these scalars as float32, so a reader gets the
    JSONL value rounded to float32.

    Flushed after every step, as the JSONL file is, so `tensorboard` follows a live run and a crash loses at
    most the step being written; `close` (the runtime's exit, also when training fails) flushes and closes.

    Resumes and rollbacks: each process writes an event file of its own beside the earlier ones (SummaryWriter
    names it by time, host and pid, and never opens an existing file), so a new attempt cannot damage what
    earlier attempts wrote. But a resumed run redoes the steps after its checkpoint, which an earlier attempt
    may have logged already, and TensorBoard's Python reader (EventAccumulator) keeps both values of such a
    step: the curve would zigzag over that range. So the file is opened at the first step logged, with that step
    as SummaryWriter's `purge_step`: it starts with a SessionLog START at that step, on which the reader drops
    every point read so far at that step or later. A step at or before the last one logged by this process
    (in-place recovery back to a snapshot) writes the same START event into the file. Each step then shows once,
    with the newest value, as "the last line of a step wins" for the JSONL file. (The Rust data server,
    `tensorboard`'s default loader where installed, also drops a series' points when its step goes back.) The
    first step logged is the purge step, not the checkpoint's: the sink never sees which step was loaded.
    """

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        # Opened by the first step logged (its purge step), so a run that fails before its first step leaves no
        # empty event file.
        self._writer: SummaryWriter | None = None
        self._last_step = -1
        self._closed = False

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self._closed:
            raise RuntimeError(f"{self.log_dir}: sink is closed")
        scalars = tensorboard_scalars(metrics)
        if not scalars:
            return
        if self._writer is None:
            # Imported here, not at the top: a run without the option never pays for torch's tensorboard import.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=step)
        elif step <= self._last_step:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            # What SummaryWriter writes for purge_step, here in the open file rather than a new one.
            self._writer.file_writer.add_event(
                Event(session_log=SessionLog(status=SessionLog.START)), step=step
            )
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()
        self._last_step = step

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def tensorboard_scalars(metrics: Mapping[str, float]) -> dict[str, float]:
    """The TensorBoard tags a metrics dict gives, with their values; a value the JSONL file would write as null,
    or cannot be computed (no wall time), is left out."""
    out = {
        tag: v for key, tag in TENSORBOARD_TAGS.items() if (v := _finite_float(metrics.get(key))) is not None
    }
    wall = _finite_float(metrics.get("step_seconds"))
    if wall and wall > 0 and ("text_tokens" in metrics or "vision_tokens" in metrics):
        tokens = metrics.get("text_tokens", 0) + metrics.get("vision_tokens", 0)
        if (rate := _finite_float(tokens / wall)) is not None:
            out[TOKENS_PER_SECOND_TAG] = rate
    return out


def _finite_float(value: float | None) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class LoggingSink:
    """One INFO line every `every` steps (rank 0 only, by the caller's choice), e.g.
    `step 120 | loss 2.3141 | 0.532 s (own 0.410, wait 0.101) | 31.2k tok/s | mfu 41.2%`."""

    def __init__(self, *, every: int = 1, logger: logging.Logger = log):
        if every < 1:
            raise ValueError(f"every: must be >= 1, got {every}")
        self.every = every
        self._log = logger

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        checkpoint = [
            (k.split("/", 1)[1], v) for k, v in metrics.items() if k.startswith("checkpoint_seconds/")
        ]
        if checkpoint:
            for op, seconds in checkpoint:
                self._log.info("step %d | checkpoint %s %.2f s", step, op, seconds)
        if "step_seconds" not in metrics or step % self.every:
            return
        parts = [f"step {step}"]
        if (loss := metrics.get("loss")) is not None:
            parts.append(f"loss {loss:.4f}")
        wall = metrics["step_seconds"]
        parts.append(
            f"{wall:.3f} s (own {metrics.get('own_work_seconds', 0.0):.3f}, "
            f"wait {metrics.get('phase_seconds/collective_wait', 0.0):.3f})"
        )
        tokens = metrics.get("text_tokens", 0) + metrics.get("vision_tokens", 0)
        if tokens and wall > 0:
            parts.append(f"{tokens / wall / 1e3:.1f}k tok/s")
        if (mfu := metrics.get("mfu")) is not None:
            parts.append(f"mfu {100 * mfu:.1f}%")
        self._log.info(" | ".join(parts))

    def close(self) -> None:
        pass
