"""Bad-data accounting: why samples were skipped, counted by reason, logged once, with a limit on their share.

Decisions:

- A bad sample never stops training by itself: its slot in the row becomes padding, so the packing plan (and with
  it exact resume) does not depend on which samples fail. What stops training is a share of bad samples above
  `max_bad_fraction` once `min_samples` have been seen: by then the data, not a few files, is broken.
- Reasons come from the exception, so any layer can name its own: the first `BadSample` in the exception's
  chain wins (not any `reason` attribute: UnicodeDecodeError's and URLError's are no counter names). Otherwise
  well-known types anywhere in the chain are mapped (a missing file, an image PIL cannot read, a PyAV error,
  JSON or UTF-8 errors), and the rest is `malformed` (ValueError: a record that does not validate) or
  `io_error` (OSError). Other exception types are bugs and propagate.
- Samples the plan drops (too long, too much vision, known bad in the cost index) count as bad too: they are
  data the run will never train on, and a row length that drops a tenth of the data should stop the run.
- Each sample is logged once per loader, not once per epoch; the counters count every occurrence, so the
  fraction stays a share of samples seen.
- Counters are plain ints so they go into a state dict and metrics as they are, and sum across ranks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields

logger = logging.getLogger(__name__)

MISSING = "missing"
CORRUPT_IMAGE = "corrupt_image"
UNDECODABLE_VIDEO = "undecodable_video"
MALFORMED = "malformed"
IO_ERROR = "io_error"
COST_MISMATCH = "cost_mismatch"  # the encoded sample disagrees with its cost (a stale cost index)


class BadSample(ValueError):
    """A sample that cannot be trained on; `reason` names its counter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class TooManyBadSamples(RuntimeError):
    pass


def classify(exc: BaseException) -> str:
    """The counter a bad-sample exception goes to; see the module docstring for the rules."""
    chain: list[BaseException] = []
    cursor: BaseException | None = exc
    while cursor is not None and cursor not in chain:
        chain.append(cursor)
        # The context too: `raise ... from None` only hides it from tracebacks (formats does that for JSON).
        cursor = cursor.__cause__ or cursor.__context__
    for e in chain:
        if isinstance(e, BadSample):
            return e.reason
    # Priority order across the whole chain: a missing file wrapped in an image error is missing, not corrupt.
    for reason, matches in _RULES:
        if any(matches(e) for e in chain):
            return reason
    return IO_ERROR if isinstance(exc, OSError) else MALFORMED


_RULES = (
    (MISSING, lambda e: isinstance(e, FileNotFoundError)),
    # By name: trainer.data.image and PIL are heavy imports (torch) for worker processes that may never decode.
    (
        CORRUPT_IMAGE,
        lambda e: type(e).__name__ in ("ImageLoadError", "UnidentifiedImageError", "DecompressionBombError"),
    ),
    (UNDECODABLE_VIDEO, lambda e: type(e).__module__.split(".")[0] == "av"),  # PyAV's decoder errors
    (MALFORMED, lambda e: isinstance(e, json.JSONDecodeError | UnicodeDecodeError)),
)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(slots=True)
class Failure:
    """One skipped sample, as a worker reports it."""

    index: int
    reason: str
    detail: str  # one line
    where: str = ""  # the sample's file:line or URI, where known


@dataclass(slots=True)
class DataCounters:
    """What the loader has delivered, for metrics and the bad-sample limit; all counts are of consumed rows."""

    samples_seen: int = 0  # placed in a row or dropped by the plan
    samples_trained: int = 0
    samples_truncated: int = 0
    rows: int = 0
    tokens: int = 0  # non-padding tokens
    padding_tokens: int = 0
    bad: dict[str, int] = field(default_factory=dict)  # reason -> samples

    @property
    def samples_bad(self) -> int:
        return sum(self.bad.values())

    def add_failures(self, failures: list[Failure]) -> None:
        for f in failures:
            self.bad[f.reason] = self.bad.get(f.reason, 0) + 1

    def as_dict(self) -> dict[str, int]:
        """Flat counters: the fields, `samples_bad`, and `bad/<reason>` per reason."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "bad"}
        out["samples_bad"] = self.samples_bad
        out.update({f"bad/{reason}": n for reason, n in sorted(self.bad.items())})
        return out

    @classmethod
    def from_dict(cls, counts: dict[str, int]) -> DataCounters:
        names = {f.name for f in fields(cls)} - {"bad"}
        return cls(
            **{k: int(v) for k, v in counts.items() if k in names},
            bad={k.removeprefix("bad/"): int(v) for k, v in counts.items() if k.startswith("bad/")},
        )

    def copy(self) -> DataCounters:
        return DataCounters.from_dict(self.as_dict())

    def __add__(self, other: DataCounters) -> DataCounters:
        mine, theirs = self.as_dict(), other.as_dict()
        return DataCounters.from_dict(
            {k: mine.get(k, 0) + theirs.get(k, 0) for k in mine.keys() | theirs.keys()}
        )


def check_bad_fraction(counters: DataCounters, *, max_fraction: float, min_samples: int) -> None:
    """Raise TooManyBadSamples when the share of bad samples is over the limit (after `min_samples` seen)."""
    seen, bad = counters.samples_seen, counters.samples_bad
    if seen < max(min_samples, 1) or bad <= max_fraction * seen:
        return
    top = sorted(counters.bad.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    reasons = ", ".join(f"{reason} {n}" for reason, n in top)
    raise TooManyBadSamples(
        f"data: {bad} of {seen} samples seen are bad ({bad / seen:.1%}, over "
        f"max_bad_fraction {max_fraction:.1%}); top reasons: {reasons}"
    )


class FailureLog:
    """Logs each bad sample the first time it is seen."""

    def __init__(self) -> None:
        self._logged: set[int] = set()

    def report(self, failures: list[Failure]) -> None:
        for f in failures:
            if f.index in self._logged:
                continue
            self._logged.add(f.index)
            logger.warning(
                "skipping sample %d (%s)%s: %s",
                f.index,
                f.reason,
                f" from {f.where}" if f.where else "",
                f.detail,
            )
