"""The pacing parts of MediaReader: a request-rate limiter, jittered backoff, and thread-safe counters.

Decisions:

* Token bucket by reservation. A caller takes a token even when the bucket is empty (the level goes
  negative) and sleeps until the moment its token is due, outside the lock. Waiters are thus served in
  arrival order at exactly the refill rate, with no polling and no thundering herd after a lull.
* Exact 1-second ceiling. The bucket holds `burst` tokens and refills at (rate - burst) per second, so any
  window of T <= 1 s sees at most burst + (rate - burst) * T <= rate grants. Sleeping can only make a request
  later than its grant, never earlier, so the bound holds for request starts too; and a second that starts
  with a full bucket needs 1 / (rate - burst) s more than a second to fit one request over the cap, which is
  the slack left for network jitter between us and the server's clock.
* Full jitter backoff: sleep a uniform draw from [0, min(max, base * 2**retry)]. Clients that were throttled
  together then come back spread out instead of in lockstep.
* Counters are flat "name" / "group.name" keys of ints and floats, ready to export as metrics.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter


class RateLimiter:
    """At most `rate` acquisitions in any 1-second window, up to `burst` of them back to back."""

    def __init__(self, rate: float, burst: int = 1, clock=time.monotonic, sleep=time.sleep) -> None:
        if burst < 1 or rate <= burst:
            raise ValueError(f"rate limiter needs rate > burst >= 1, got rate={rate} burst={burst}")
        self._refill_per_s = rate - burst
        self._capacity = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._updated = clock()

    def acquire(self) -> float:
        """Take one token, sleeping until it is due; return the seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._refill_per_s)
            self._updated = now
            self._tokens -= 1.0
            wait = -self._tokens / self._refill_per_s if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


def backoff_s(retry: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full-jitter delay before retry number `retry` (0 for the first retry)."""
    return rng.uniform(0.0, min(max_s, base_s * 2.0**retry))


class StorageCounters:
    """What a MediaReader did, for metrics: requests, bytes, retries by reason, failures by kind, waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ints: Counter[str] = Counter()
        self._rate_wait_s = 0.0
        self._in_flight = 0
        self._in_flight_peak = 0

    def request_started(self) -> None:
        with self._lock:
            self._ints["requests"] += 1
            self._in_flight += 1
            self._in_flight_peak = max(self._in_flight_peak, self._in_flight)

    def request_ended(self, nbytes: int = 0) -> None:
        with self._lock:
            self._in_flight -= 1
            self._ints["bytes"] += nbytes

    def retried(self, reason: str) -> None:
        with self._lock:
            self._ints["retries"] += 1
            self._ints[f"retries.{reason}"] += 1

    def failed(self, kind: str) -> None:
        with self._lock:
            self._ints["failures"] += 1
            self._ints[f"failures.{kind}"] += 1

    def rate_waited(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._ints["rate_limited_waits"] += 1
                self._rate_wait_s += seconds

    def as_dict(self) -> dict[str, float]:
        """A snapshot: requests, bytes, retries, retries.<reason>, failures, failures.<kind>,
        rate_limited_waits, rate_limited_wait_s, in_flight, in_flight_peak."""
        with self._lock:
            out: dict[str, float] = {
                "requests": 0,
                "bytes": 0,
                "retries": 0,
                "failures": 0,
                "rate_limited_waits": 0,
            }
            out.update(self._ints)
            out["rate_limited_wait_s"] = self._rate_wait_s
            out["in_flight"] = self._in_flight
            out["in_flight_peak"] = self._in_flight_peak
            return dict(sorted(out.items()))
