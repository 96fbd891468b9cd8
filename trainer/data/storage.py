"""MediaReader: read whole image and video objects from object storage, politely and with honest counts.

Qwen2-VL's training media sit in object storage and are read concurrently, with concurrency and retries tuned
to stay under the store's request-rate limits. This reader does that for one process: at most
`max_in_flight` requests at once, at most `max_requests_per_second` request starts in any second (retries
included), exponential backoff with full jitter on throttling and transient errors, and no retry at all on
403/404, which become MediaForbidden / MediaNotFound (ValueErrors: the loader skips the sample).

    reader = MediaReader(StorageConfig(max_requests_per_second=200,
                                       storage_options={"s3": {"endpoint_url": "http://minio:9000"}}))
    data = reader.read("s3://bucket/videos/0001.mp4")
    key = reader.version("s3://bucket/videos/0001.mp4")  # "etag:..." -- a cache key for decoded media
    for item in reader.prefetch(uris):                   # in order; errors arrive with their item
        ...

Decisions:

* Accepts local paths, file://, s3:// (s3fs), http(s):// and any other fsspec protocol; see
  storage_backends.py for how each makes exactly one attempt. Chained URLs ("simplecache::s3://...") are
  rejected: a caching layer would hide requests from the limits, and whole-object reads gain nothing from it.
* Order of limits per attempt: take an in-flight slot, then a rate token, then send at once. Taking the
  token first would let requests that waited for a slot start together, in a burst above the cap.
  Backoff sleeps hold neither.
* Library retries are off (s3fs retries=1, botocore total_max_attempts=1): every attempt the reader counts
  is one request on the wire, so `counters()` and the rate cap are exact.
* Per process. Build the reader in each data-loader worker; pickling a reader (as worker start-up does)
  sends only its config, and the copy starts with fresh connections and counters.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from fsspec.core import split_protocol

from trainer.data.storage_backends import LOCAL_PROTOCOLS, Backend, make_backend
from trainer.data.storage_config import StorageConfig
from trainer.data.storage_errors import (
    MediaForbidden,
    MediaNotFound,
    MediaReadError,
    MediaUnavailable,
    classify,
    sample_error,
)
from trainer.data.storage_limits import RateLimiter, StorageCounters, backoff_s

__all__ = [
    "Fetched",
    "MediaForbidden",
    "MediaNotFound",
    "MediaReadError",
    "MediaReader",
    "MediaUnavailable",
    "StorageConfig",
]

T = TypeVar("T")
_GIVE_UP = frozenset({"not_found", "forbidden", "error", "unexpected"})


@dataclass(frozen=True, slots=True)
class Fetched:
    """One prefetched object: its bytes, or the error reading it raised."""

    uri: str
    data: bytes | None
    error: Exception | None

    def unwrap(self) -> bytes:
        if self.error is not None:
            raise self.error
        assert self.data is not None
        return self.data


class MediaReader:
    """Whole-object reads under one process's concurrency, rate and retry limits (see StorageConfig)."""

    def __init__(self, config: StorageConfig | None = None, *, seed: int | None = None) -> None:
        self.config = config if config is not None else StorageConfig()
        self._slots = threading.BoundedSemaphore(self.config.max_in_flight)
        rate = self.config.max_requests_per_second
        self._limiter = RateLimiter(rate, self.config.rate_burst) if rate is not None else None
        self._counters = StorageCounters()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._backends: dict[str | None, Backend] = {}
        self._pool: ThreadPoolExecutor | None = None

    def __reduce__(self) -> tuple[type[MediaReader], tuple[StorageConfig]]:
        return MediaReader, (self.config,)

    def read(self, uri: str | os.PathLike[str]) -> bytes:
        """The whole object's bytes. Raises MediaNotFound / MediaForbidden / MediaReadError (ValueErrors)
        for the sample's own problems and MediaUnavailable (OSError) when retries ran out."""
        return self._attempts(os.fspath(uri), "read", len)

    def version(self, uri: str | os.PathLike[str]) -> str:
        """A string that changes when the object changes: "etag:<ETag>" where the store has ETags (s3, most
        HTTP servers), "mtime_ns:<ns>:size:<bytes>" for local files. Same errors as read()."""
        return self._attempts(os.fspath(uri), "version", lambda _: 0)

    def counters(self) -> dict[str, float]:
        """requests, bytes, retries and retries.<reason>, failures and failures.<kind>, rate_limited_waits,
        rate_limited_wait_s, in_flight, in_flight_peak."""
        return self._counters.as_dict()

    def prefetch(self, uris: Iterable[str], depth: int | None = None) -> Iterator[Fetched]:
        """Read `uris` in background threads, keeping up to `depth` (default prefetch_depth) reads ahead of
        the consumer, and yield them in input order. A failed read is yielded as a Fetched with its error."""
        depth = self.config.prefetch_depth if depth is None else depth
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        pool = self._executor()
        pending: deque[Future[Fetched]] = deque()
        try:
            for uri in uris:
                pending.append(pool.submit(self._fetch, uri))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # the consumer stopped early: drop reads that have not started
                future.cancel()

    def close(self) -> None:
        """Stop the prefetch threads (reads already running finish)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> MediaReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fetch(self, uri: str) -> Fetched:
        try:
            return Fetched(uri, self.read(uri), None)
        except Exception as exc:  # delivered with the item; the consumer decides
            return Fetched(uri, None, exc)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.config.prefetch_threads, thread_name_prefix="media-prefetch"
                )
            return self._pool

    def _backend(self, uri: str) -> Backend:
        if not isinstance(uri, str) or not uri:
            raise MediaReadError(f"media uri must be a non-empty string or path, got {uri!r}")
        if "::" in uri:
            raise MediaReadError(f"chained fsspec URLs are not supported (they hide requests): {uri}")
        protocol, _ = split_protocol(uri)
        key = None if protocol is None or protocol in LOCAL_PROTOCOLS else protocol
        with self._lock:
            backend = self._backends.get(key)
            if backend is None:
                backend = self._backends[key] = make_backend(key, self.config)
            return backend

    def _attempts(self, uri: str, op: str, size: Callable[[T], int]) -> T:
        backend = self._backend(uri)
        call: Callable[[str], T] = getattr(backend, op)
        cfg = self.config
        retry = 0
        while True:
            with self._slots:
                if self._limiter is not None and backend.remote:
                    self._counters.rate_waited(self._limiter.acquire())
                self._counters.request_started()
                try:
                    result = call(uri)
                except Exception as exc:
                    self._counters.request_ended()
                    failure: Exception = exc
                else:
                    self._counters.request_ended(size(result))
                    return result
            kind = classify(failure)
            if kind == "unexpected":
                self._counters.failed(kind)
                raise failure
            if kind in _GIVE_UP:
                self._counters.failed(kind)
                raise sample_error(kind, uri, failure) from failure
            if retry >= cfg.max_retries:
                self._counters.failed("exhausted")
                raise MediaUnavailable(
                    f"media unavailable after {retry + 1} attempts: {uri} "
                    f"(last: {kind}, {type(failure).__name__}: {failure})"
                ) from failure
            self._counters.retried(kind)
            time.sleep(backoff_s(retry, cfg.backoff_base_s, cfg.backoff_max_s, self._rng))
            retry += 1
