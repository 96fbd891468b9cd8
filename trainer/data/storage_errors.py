"""Errors of MediaReader and the rule that sorts a failed request into retry, give up, or skip the sample.

Decisions:

* Sample errors are ValueErrors (MediaReadError and its MediaNotFound / MediaForbidden): the object is
  missing, not ours to read, or not an object; retrying cannot help and the loader skips the sample.
  MediaUnavailable is an OSError instead: the store kept failing transiently past max_retries, which says
  nothing about the sample, so a loader may count it separately or stop.
* Retried: HTTP 429, 500, 502, 503 and 504 (S3 throttles with 503 SlowDown, other stores with 429),
  timeouts, and dropped or reset connections. Never retried: 403, 404 and every other status. Exceptions
  that are neither OSErrors nor HTTP answers (bugs, missing credentials) are re-raised unchanged.
* The status is read from the exception or anything in its cause chain, so a library that wraps a botocore
  ClientError or an aiohttp ClientResponseError in an OSError is still classified by the real status.
* Retry reasons are "http_<status>", "throttled", "timeout" or "connection": they are counter names, so a metrics
  dashboard shows throttling apart from server errors and network trouble.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchVersion"})
_FORBIDDEN_CODES = frozenset({"AccessDenied", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId"})
_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded"}
)

# Network failures of the optional HTTP stacks, collected if they are installed.
_TIMEOUTS: tuple[type[BaseException], ...] = (TimeoutError,)
_CONNECTION: tuple[type[BaseException], ...] = (ConnectionError, http.client.IncompleteRead, EOFError)
try:
    from fsspec.exceptions import FSTimeoutError

    _TIMEOUTS += (FSTimeoutError,)
except ImportError:  # pragma: no cover - fsspec is a dependency; kept for a partial install
    pass
try:
    import botocore.exceptions as _bce

    _TIMEOUTS += (_bce.ReadTimeoutError, _bce.ConnectTimeoutError)
    _CONNECTION += (_bce.HTTPClientError, _bce.ResponseStreamingError)
except ImportError:  # pragma: no cover
    pass
try:
    import aiohttp

    _TIMEOUTS += (aiohttp.ServerTimeoutError,)
    _CONNECTION += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
except ImportError:  # pragma: no cover
    pass


class MediaReadError(ValueError):
    """A media object cannot be read and retrying will not help (e.g. HTTP 400, a directory)."""


class MediaNotFound(MediaReadError):
    """The media object does not exist (HTTP 404, NoSuchKey, no such file)."""


class MediaForbidden(MediaReadError):
    """The credentials may not read the media object (HTTP 403, AccessDenied, file permissions)."""


class MediaUnavailable(OSError):
    """The store kept failing transiently (throttling, 5xx, timeouts) after every allowed retry."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _status_and_code(exc: BaseException) -> tuple[int | None, str | None]:
    for err in _chain(exc):
        response = getattr(err, "response", None)  # botocore ClientError
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response["Error"].get("Code")
            return (int(status) if status else _int_or_none(code)), code
        status = getattr(err, "status", None)  # aiohttp ClientResponseError
        if isinstance(status, int) and 100 <= status <= 599:
            return status, None
    return None, None


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def classify(exc: BaseException) -> str:
    """Sort a failed request: "not_found", "forbidden", "error" (do not retry: a bad sample), "unexpected"
    (do not retry: re-raise as is), or a retry reason ("http_<status>", "throttled", "timeout",
    "connection")."""
    status, code = _status_and_code(exc)
    if status == 404 or code in _NOT_FOUND_CODES:
        return "not_found"
    if status == 403 or code in _FORBIDDEN_CODES:
        return "forbidden"
    if code in _THROTTLE_CODES and status not in RETRY_STATUSES:
        return "throttled"  # e.g. a 400 ThrottlingException: the code, not the status, says "slow down"
    if status is not None:
        return f"http_{status}" if status in RETRY_STATUSES else "error"
    chain = list(_chain(exc))
    if any(isinstance(e, FileNotFoundError) for e in chain):
        return "not_found"
    if any(isinstance(e, PermissionError) for e in chain):
        return "forbidden"
    if any(isinstance(e, _TIMEOUTS) for e in chain):
        return "timeout"
    if any(isinstance(e, _CONNECTION) for e in chain):
        return "connection"
    # Any other OSError is the object's or the path's problem; anything else is a bug or a setup error
    # (e.g. no credentials) and must surface, not be skipped as a bad sample.
    return "error" if any(isinstance(e, OSError) for e in chain) else "unexpected"


def sample_error(kind: str, uri: str, exc: BaseException) -> MediaReadError:
    """The ValueError to raise for a non-retryable failure of `uri`."""
    detail = f"{type(exc).__name__}: {exc}"
    if kind == "not_found":
        return MediaNotFound(f"media not found: {uri} ({detail})")
    if kind == "forbidden":
        return MediaForbidden(f"media access denied: {uri} ({detail})")
    return MediaReadError(f"cannot read media {uri}: {detail}")
