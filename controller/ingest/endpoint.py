"""The rank-endpoint scrape: each rank's HTTP metrics endpoint, found through `metrics-rank{N}.endpoint.json`.

Decisions:

- An endpoint file carries the launcher's attempt (absent: 0); endpoints of any other attempt are not scraped.
  A file is read again only when it changed (inode, mtime, size).
- A scrape's step sample is the newest step only (see `ScrapedRanks`); a rank whose scrape fails keeps its
  state and counts a failure.
- Scale: a poll scrapes at most `max_scrapes_per_poll` ranks, the next ones in turn (round robin), so its cost
  is bounded whatever the job's size: every rank every poll up to that many ranks; at 16,384 ranks and 512 a
  poll, each rank every 32 polls. A scrape costs about 0.9 ms of the controller's CPU (the HTTP exchange, then
  the text read by `parse_rank_metrics`), so scraping 16,384 ranks every second would need 15 cores. The
  straggler detector learns the sparser cadence (controller.stragglers: windows count samples, not steps), and
  a rank's progress timestamp is at most one sweep old, far inside any hang timeout. Scrapes of one poll run
  concurrently (`max_workers` threads); a poll keeps one sample per rank. Where every rank's every step
  matters at that size, the Prometheus path (a server that scrapes anyway) or the JSONL path are the cheaper
  sources; docs/benchmarks.md has each one's cost.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from controller.stragglers import StepSample
from trainer.contract.telemetry import ENDPOINT_FILE, PREFIX, RankSample, parse_rank_metrics

from .state import ATTEMPT_KEY, CheckpointOp, ScrapedRanks, TelemetryUpdate


@dataclass(frozen=True, slots=True)
class _Endpoint:
    stamp: tuple[int, int, int]  # (inode, mtime_ns, size) of the file it was read from
    url: str | None
    attempt: int


class EndpointTelemetry:
    """Scrapes every rank's endpoint of the attempt, concurrently; a failed scrape keeps the rank's state."""

    def __init__(
        self,
        run_dir: str | Path,
        num_ranks: int,
        attempt: int,
        *,
        timeout_seconds: float = 2.0,
        max_workers: int = 32,
        max_scrapes_per_poll: int = 512,
    ):
        if num_ranks < 1:
            raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds: must be > 0, got {timeout_seconds}")
        if max_workers < 1:
            raise ValueError(f"max_workers: must be >= 1, got {max_workers}")
        if max_scrapes_per_poll < 1:
            raise ValueError(f"max_scrapes_per_poll: must be >= 1, got {max_scrapes_per_poll}")
        self.max_scrapes_per_poll = max_scrapes_per_poll
        self._next = 0  # the first rank of the next poll's turn
        self.run_dir = Path(run_dir)
        self.num_ranks = num_ranks
        self.attempt = attempt
        self.timeout_seconds = timeout_seconds
        self.failures_total = 0  # failed scrapes since construction
        self._paths = [self.run_dir / ENDPOINT_FILE.format(rank=r) for r in range(num_ranks)]
        self._endpoints: list[_Endpoint | None] = [None] * num_ranks
        self._ranks = ScrapedRanks(self.num_ranks, attempt)
        self._pool = ThreadPoolExecutor(max_workers=min(max_workers, num_ranks), thread_name_prefix="scrape")

    def start_attempt(self, attempt: int, *, launched_at: float | None = None) -> None:
        self.attempt = attempt
        self._ranks = ScrapedRanks(self.num_ranks, attempt)

    def poll(self, now: float) -> TelemetryUpdate:
        failed: dict[int, str] = {}
        targets = []
        turn = min(self.max_scrapes_per_poll, self.num_ranks)
        first, self._next = self._next, (self._next + turn) % self.num_ranks
        for rank in (r % self.num_ranks for r in range(first, first + turn)):
            try:
                endpoint = self._endpoint(rank)
            except ValueError as e:
                failed[rank] = str(e)
                continue
            if endpoint is not None and endpoint.attempt == self.attempt and endpoint.url:
                targets.append((rank, endpoint.url))
        steps: list[StepSample] = []
        ops: list[CheckpointOp] = []
        results = self._pool.map(lambda t: self._scrape(*t), targets)
        for (rank, _), (sample, error) in zip(targets, results, strict=True):
            if sample is not None:
                self._ranks.observe(sample, now, steps, ops)
            else:
                failed[rank] = error
        for rank in failed:
            self._ranks.fail(rank)
        self.failures_total += len(failed)
        return TelemetryUpdate(
            attempt=self.attempt,
            steps=steps,
            ranks=self._ranks.states(),
            checkpoint_ops=ops,
            failed=failed,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _endpoint(self, rank: int) -> _Endpoint | None:
        """The rank's endpoint file, read again only when it changed; None before the rank serves."""
        path = self._paths[rank]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._endpoints[rank]
        if cached is not None and cached.stamp == stamp:
            return cached
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            url, attempt = info.get("url"), info.get(ATTEMPT_KEY, 0)
        except (OSError, ValueError, AttributeError):
            raise ValueError(f"{path.name}: not a JSON object with a url") from None
        if not isinstance(url, str) or not isinstance(attempt, int):
            raise ValueError(f"{path.name}: url must be a string and attempt an integer")
        self._endpoints[rank] = _Endpoint(stamp=stamp, url=url, attempt=attempt)
        return self._endpoints[rank]

    def _scrape(self, rank: int, url: str) -> tuple[RankSample | None, str]:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_seconds) as response:
                text = response.read().decode("utf-8")
            samples = [s for s in parse_rank_metrics(text) if s.rank == rank]
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts: OSErrors
            return None, f"{url}: {getattr(e, 'reason', None) or e}"
        if not samples:
            return None, f"{url}: no {PREFIX}* series for rank {rank}"
        return samples[0], ""
