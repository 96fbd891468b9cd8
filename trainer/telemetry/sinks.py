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
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

log = logging.getLogger("trainer.telemetry")


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
