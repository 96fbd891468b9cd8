"""The Prometheus HTTP API reader: the ranks' series from a Prometheus server (clusters, where Prometheus already
scrapes the pods), the newest step per poll.

Decisions:

- Series carry no attempt: a series of a process started before the attempt's launch (less the clock skew) is
  skipped, and where a rank has several (an old pod not yet stale) the newest process wins.
- A poll is one instant query for about 20 series per rank (about 330k at 16,384 ranks: tens of MB of JSON,
  poll it every 15 s or slower); a failed query keeps the ranks' states and is reported as the update's error.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from controller.stragglers import StepSample
from trainer.contract.telemetry import (
    CHECKPOINT_LABEL,
    LABEL_LOCAL_RANK,
    LABEL_NODE,
    LABEL_RANK,
    LABEL_TRAINING_JOB,
    METRICS,
    METRICS_BY_NAME,
    PHASE_LABEL,
    RankSample,
)

from .state import CheckpointOp, ScrapedRanks, TelemetryUpdate

log = logging.getLogger("controller.ingest")  # the package's logger, whichever source warns

# The series the ingest reads (what RankState holds); the rest of the contract stays on the server.
_UNREAD = ("mfu", "sync_wait_seconds", "micro_steps_total")
QUERIED = tuple(m.name for m in METRICS if m.field not in _UNREAD)
_METRIC_LABELS = ("__name__", PHASE_LABEL, CHECKPOINT_LABEL)  # the rest of a label set names the process


class PrometheusTelemetry:
    """Reads the attempt's ranks through a Prometheus server's instant-query API."""

    def __init__(
        self,
        base_url: str,
        training_job: str,
        attempt: int,
        num_ranks: int,
        *,
        launched_at: float | None = None,
        clock_skew_seconds: float = 5.0,
        timeout_seconds: float = 10.0,
    ):
        """launched_at: when the attempt was launched; series of processes started more than
        clock_skew_seconds before it belong to an earlier attempt and are skipped."""
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http(s) URL, got {base_url!r}")
        if not training_job:
            raise ValueError("training_job: must not be empty")
        if num_ranks < 1:
            raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
        self.base_url = base_url.rstrip("/")
        self.training_job = training_job
        self.attempt = attempt
        self.num_ranks = num_ranks
        self.launched_at = launched_at
        self.clock_skew_seconds = clock_skew_seconds
        self.timeout_seconds = timeout_seconds
        self.failures_total = 0  # failed queries since construction
        self._ranks = ScrapedRanks(self.num_ranks, attempt)
        job = training_job.replace("\\", "\\\\").replace('"', '\\"')
        self.query = f'{{__name__=~"{"|".join(QUERIED)}", {LABEL_TRAINING_JOB}="{job}"}}'

    def start_attempt(self, attempt: int, *, launched_at: float | None = None) -> None:
        self.attempt = attempt
        self.launched_at = launched_at
        self._ranks = ScrapedRanks(self.num_ranks, attempt)

    def poll(self, now: float) -> TelemetryUpdate:
        steps: list[StepSample] = []
        ops: list[CheckpointOp] = []
        try:
            samples = self.rank_samples(self.fetch())
        except (OSError, ValueError, http.client.HTTPException) as e:
            self.failures_total += 1
            return TelemetryUpdate(
                attempt=self.attempt,
                steps=steps,
                ranks=self._ranks.states(),
                checkpoint_ops=ops,
                error=f"{self.base_url}: {getattr(e, 'reason', None) or e}",
            )
        for sample in samples:
            self._ranks.observe(sample, now, steps, ops)
        return TelemetryUpdate(
            attempt=self.attempt, steps=steps, ranks=self._ranks.states(), checkpoint_ops=ops
        )

    def close(self) -> None:
        pass

    def fetch(self) -> list[dict]:
        """The instant vector of the job's series, as the API returns it."""
        url = f"{self.base_url}/api/v1/query?" + urllib.parse.urlencode({"query": self.query})
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_seconds) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:  # the API explains a bad query in a JSON body
            try:
                message = json.load(e).get("error", e.reason)
            except ValueError:
                message = e.reason
            raise ValueError(f"query failed ({e.code}): {message}") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            raise ValueError(f"query failed: {body.get('error') if isinstance(body, dict) else body!r}")
        data = body.get("data")
        if (
            not isinstance(data, dict)
            or data.get("resultType") != "vector"
            or not isinstance(data.get("result"), list)
        ):
            raise ValueError("query failed: the answer is not an instant vector")
        return data["result"]

    def rank_samples(self, results: Sequence[Mapping[str, Any]]) -> list[RankSample]:
        """An instant vector -> one RankSample per rank of this attempt (the newest process where a rank has
        several). Series without a usable rank label, or outside the job's ranks, are skipped with a warning."""
        processes: dict[tuple, RankSample] = {}
        outside = set()
        for series in results:
            try:
                labels, value = dict(series["metric"]), float(series["value"][1])  # "NaN" is a string too
            except (KeyError, IndexError, TypeError, ValueError):
                raise ValueError(f"not a sample of an instant vector: {str(series)[:200]}") from None
            spec = METRICS_BY_NAME.get(labels.get("__name__", ""))
            if spec is None:
                continue
            try:
                rank = int(labels[LABEL_RANK])
                local_rank = int(labels.get(LABEL_LOCAL_RANK, "0"))
            except (KeyError, ValueError):
                outside.add(labels.get(LABEL_RANK))
                continue
            if not 0 <= rank < self.num_ranks:
                outside.add(rank)
                continue
            key = tuple(sorted((k, v) for k, v in labels.items() if k not in _METRIC_LABELS))
            sample = processes.get(key)
            if sample is None:
                sample = processes[key] = RankSample(
                    training_job=labels.get(LABEL_TRAINING_JOB, ""),
                    node=labels.get(LABEL_NODE, ""),
                    rank=rank,
                    local_rank=local_rank,
                )
            if spec.label:
                if spec.label in labels:
                    getattr(sample, spec.field)[labels[spec.label]] = value
            elif spec.field in ("step", "pid"):
                setattr(sample, spec.field, int(value) if math.isfinite(value) else None)
            else:
                setattr(sample, spec.field, value)
        if outside:
            log.warning(
                "%s: skipped series with rank label(s) %s, outside 0..%d",
                self.training_job,
                ", ".join(sorted(map(str, outside))[:8]),
                self.num_ranks - 1,
            )
        newest: dict[int, RankSample] = {}
        oldest_allowed = None if self.launched_at is None else self.launched_at - self.clock_skew_seconds
        for sample in processes.values():
            started = sample.process_start_time_seconds
            if oldest_allowed is not None and started is not None and started < oldest_allowed:
                continue  # a process of an earlier attempt, not yet stale in Prometheus
            best = newest.get(sample.rank)
            if best is None or (started or -math.inf) > (best.process_start_time_seconds or -math.inf):
                newest[sample.rank] = sample
        return [newest[r] for r in sorted(newest)]
