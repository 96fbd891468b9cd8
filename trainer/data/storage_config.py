"""StorageConfig: how hard one process may lean on the object store that holds images and videos.

Every limit here is per process (per MediaReader; keep one reader per process). A job of P reader processes
against a store that allows N requests/s should set `max_requests_per_second` to at most N / P.

Decisions:

* The rate cap is a hard ceiling: no 1-second window contains more than `max_requests_per_second` request
  starts, retries included. The token bucket that enforces it holds `rate_burst` tokens and refills at
  (max_requests_per_second - rate_burst) per second, so a full burst plus a second of refill is exactly the
  cap (storage_limits.py). None means no cap. Local files are exempt: there is no store to protect.
* Secrets are only referenced, never stored: credentials come from the environment and the standard AWS
  chain (env vars, shared credentials file by `profile`, instance roles). Storage options whose names look
  like secrets (key, secret, token, password, ...) are rejected, so a config file or a logged config cannot
  leak one.
* Retry settings of the underlying libraries (s3fs `retries`, botocore `config_kwargs["retries"]`) are owned
  by the reader, which turns them off so that retry counts and the rate cap are its own; setting them here is
  an error rather than a silent override.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Option names that hold credentials. `profile` is allowed: it names credentials, it does not hold them.
_SECRET_NAME = re.compile(
    r"secret|token|passw|credential|authorization|api_?key|private_?key|(^|_)key$", re.I
)
_READER_OWNED = {"retries"}


@dataclass(kw_only=True, slots=True)
class StorageConfig:
    """Limits and options of one process's MediaReader."""

    max_in_flight: int = 16  # requests in flight at once, all threads of the process together
    max_requests_per_second: float | None = None  # hard cap on request starts in any 1 s window
    rate_burst: int = 1  # tokens the rate limiter can bank (back-to-back requests after a lull)
    max_retries: int = 8  # retries after the first attempt, per read
    backoff_base_s: float = 0.1  # full jitter: sleep ~ U(0, min(backoff_max_s, backoff_base_s * 2**retry))
    backoff_max_s: float = 20.0
    request_timeout_s: float | None = 120.0  # per attempt, whole object; None waits forever
    prefetch_depth: int = 32  # reads submitted ahead of the consumer by prefetch()
    prefetch_threads: int = 16  # threads that run them; in-flight requests stay <= max_in_flight
    # fsspec options per URL scheme, e.g. {"s3": {"endpoint_url": "http://minio:9000"}}; "s3a" falls back to
    # "s3" and "https" to "http".
    storage_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive_int("max_in_flight", self.max_in_flight)
        _positive_int("rate_burst", self.rate_burst)
        _positive_int("prefetch_depth", self.prefetch_depth)
        _positive_int("prefetch_threads", self.prefetch_threads)
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}")
        if self.max_requests_per_second is not None:
            _positive_float("max_requests_per_second", self.max_requests_per_second)
            if self.max_requests_per_second <= self.rate_burst:
                raise ValueError(
                    f"max_requests_per_second must be above rate_burst ({self.rate_burst}), "
                    f"got {self.max_requests_per_second!r}"
                )
        _positive_float("backoff_base_s", self.backoff_base_s)
        _positive_float("backoff_max_s", self.backoff_max_s)
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_base_s ({self.backoff_base_s})"
            )
        if self.request_timeout_s is not None:
            _positive_float("request_timeout_s", self.request_timeout_s)
        if not isinstance(self.storage_options, Mapping):
            raise ValueError(
                f"storage_options must be a dict of dicts, got {type(self.storage_options).__name__}"
            )
        for protocol, options in self.storage_options.items():
            if not isinstance(protocol, str) or not isinstance(options, Mapping):
                raise ValueError(f"storage_options[{protocol!r}] must map a URL scheme to a dict of options")
            _check_options(f"storage_options[{protocol!r}]", options)

    def options_for(self, protocol: str) -> dict[str, Any]:
        """The fsspec options for `protocol`, falling back from an alias to its base scheme."""
        fallback = {"s3a": "s3", "https": "http"}.get(protocol, protocol)
        return dict(self.storage_options.get(protocol, self.storage_options.get(fallback, {})))


def _check_options(where: str, options: Mapping[str, Any]) -> None:
    for name, value in options.items():
        if not isinstance(name, str):
            raise ValueError(f"{where} has a non-string option name {name!r}")
        if _SECRET_NAME.search(name):
            raise ValueError(
                f"{where}[{name!r}] looks like a credential; secrets are not stored in config: set them in "
                "the environment or the AWS credential chain (e.g. AWS_ACCESS_KEY_ID, or `profile`)"
            )
        if name in _READER_OWNED:
            raise ValueError(
                f"{where}[{name!r}] is set by MediaReader (it counts retries itself): use max_retries"
            )
        if isinstance(value, Mapping):
            _check_options(f"{where}[{name!r}]", value)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _positive_float(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
