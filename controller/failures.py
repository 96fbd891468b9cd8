"""Why an attempt ended: ordered classification rules (first match wins), then the user's rules on top.

Decisions:

- The default rules run in a fixed order, most specific evidence first. What the controller did itself comes
  before what the processes show, because its own teardown leaves SIGTERM/SIGKILL exits on every rank:
  Cancelled, StragglerExcluded, then Succeeded, NodeLost (the survivors of a lost node hang or crash in their
  collectives), Hang (we killed the stuck gang), ConfigError (the trainer's exit code 2: deterministic, never
  retried), StorageUnavailable (exit code 74: the checkpoint storage stayed unwritable past the trainer's
  limit), Preempted, OutOfMemory, CrashBeforeFirstStep, Crash, and Unknown when nothing matched.
- Preempted needs the backend's word, or every failing rank stopping the way a graceful stop does (exit code
  EXIT_PREEMPTED, or SIGTERM): ranks the controller stopped after another rank crashed show the same codes,
  and the crash must win.
- OutOfMemory: the backend's OOM-kill flag (Kubernetes' OOMKilled, exit 137), or an out-of-memory error in the
  rank's log tail (a device OOM, or a host MemoryError, which a local rank meets at its RLIMIT_DATA). The local
  kernel OOM killer is indistinguishable from `kill -9` and stays a Crash; the rank limit keeps it away.
- CrashBeforeFirstStep is retryable and counts: one retry covers a flaky start (a rendezvous timeout), and
  policy's crash-loop guard turns a repeat into a UserError.
- Culprits: failing ranks other than the ones stopped the graceful way; the backend's root cause first (the
  first failure in the node that ended first: a rank that lost its peer fails too, later), then earliest exit,
  then by rank. A node whose agent was killed outright is described as such, not as a rank that was killed.
- User rules (JobSet failurePolicy style) are tried in order after the default classification, so they can
  match its reason as well as exit codes, signals and a message regex; all the criteria a rule sets must hold
  (any value of each). The first that matches sets the action. Success and cancellation are never overridden.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from controller.hangs import HangVerdict
from trainer.contract import EXIT_USER_ERROR  # the trainer's exit code for invalid configuration
from trainer.contract.telemetry import (
    EXIT_FAULT_CRASH,
    EXIT_PREEMPTED,
    EXIT_STORAGE_UNAVAILABLE,
    STORAGE_UNAVAILABLE,
)

OOM_LOG_PATTERN = re.compile(
    r"CUDA out of memory|OutOfMemoryError|HIP out of memory|^MemoryError\b|DefaultCPUAllocator: can.t allocate memory",
    re.MULTILINE,
)
MAX_SIGNAL = 64


class ExitClass(StrEnum):
    """Each value is the CamelCase reason constant written into conditions and events."""

    SUCCEEDED = "Succeeded"
    CANCELLED = "Cancelled"
    STRAGGLER_EXCLUDED = "StragglerExcluded"
    HANG = "Hang"
    NODE_LOST = "NodeLost"
    CONFIG_ERROR = "ConfigError"
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    PREEMPTED = "Preempted"
    OOM = "OutOfMemory"
    CRASH_BEFORE_FIRST_STEP = "CrashBeforeFirstStep"
    CRASH = "Crash"
    UNKNOWN = "Unknown"
    USER_ERROR = (
        "UserError"  # never from a rule: policy's crash-loop guard gives it to repeated early crashes
    )


FINAL_CLASSES = (ExitClass.SUCCEEDED, ExitClass.CANCELLED)  # user rules never override these


class FailureAction(StrEnum):
    RETRY = "retry"  # restart, counting toward max_restarts
    FAIL = "fail"  # stop the job as failed
    IGNORE_FOR_LIMIT = "ignore-for-limit"  # restart without counting it

    @property
    def retryable(self) -> bool:
        return self is not FailureAction.FAIL

    @property
    def counts_toward_limit(self) -> bool:
        return self is FailureAction.RETRY


@dataclass(kw_only=True, slots=True, frozen=True)
class RankExit:
    rank: int
    node: str = ""
    exit_code: int | None = None  # None: still running, or status unknown
    signal: int | None = None  # the terminating signal, when the backend reports it apart from the code
    oom_killed: bool = False  # the backend saw an OOM kill (Kubernetes reason OOMKilled)
    exited_at: float | None = None
    log_tail: str = ""
    root_cause: bool = False  # the backend saw this rank fail first (in the node that ended first)
    agent: bool = False  # the node's agent (torchrun) ended without a report: this is the node's status

    @classmethod
    def from_returncode(cls, rank: int, returncode: int | None, **kwargs) -> RankExit:
        """From Popen's returncode, where -N means killed by signal N (a shell would say 128+N)."""
        if returncode is not None and returncode < 0:
            return cls(rank=rank, exit_code=128 - returncode, signal=-returncode, **kwargs)
        return cls(rank=rank, exit_code=returncode, **kwargs)

    @property
    def term_signal(self) -> int | None:
        if self.signal is not None:
            return self.signal
        if self.exit_code is not None and 128 < self.exit_code <= 128 + MAX_SIGNAL:
            return self.exit_code - 128
        return None

    @property
    def failed(self) -> bool:
        return (self.exit_code is not None and self.exit_code != 0) or self.signal is not None

    @property
    def stopped_gracefully(self) -> bool:
        return self.exit_code == EXIT_PREEMPTED or self.term_signal == signal.SIGTERM

    @property
    def out_of_memory(self) -> bool:
        return self.oom_killed or bool(OOM_LOG_PATTERN.search(self.log_tail))


@dataclass(kw_only=True, slots=True)
class AttemptEnd:
    """Everything known about an attempt once its processes are gone."""

    ranks: tuple[RankExit, ...]
    last_step: int | None = None  # highest step completed in the attempt
    progressed: bool | None = None  # any step or micro-step reported; None: last_step is not None
    hang: HangVerdict | None = None  # set when the controller stopped the gang as hung
    lost_nodes: tuple[str, ...] = ()  # nodes the backend reported gone
    preempted: bool = False  # the backend reported a preemption (spot reclaim, eviction)
    cancelled: bool = False  # the user cancelled the job
    excluded_node: str | None = None  # the controller stopped the gang to exclude this straggler node

    def __post_init__(self) -> None:
        self.ranks = tuple(self.ranks)
        self.lost_nodes = tuple(self.lost_nodes)
        if self.progressed is None:
            self.progressed = self.last_step is not None
        if self.last_step is not None and self.last_step < 0:
            raise ValueError(f"last_step: must be >= 0, got {self.last_step}")


@dataclass(frozen=True, slots=True)
class Classification:
    exit_class: ExitClass
    message: str
    retryable: bool
    counts_toward_limit: bool
    step: int | None  # the attempt's last completed step; None: it never completed one
    ranks: tuple[int, ...] = ()  # culprits, most likely first
    rule: str = ""  # the user rule that set the action; "" for the defaults
    trained_seconds: float | None = None  # from its first step to its failure (None: unknown, or no step)

    @property
    def reason(self) -> str:
        return self.exit_class.value


@dataclass(kw_only=True, slots=True)
class FailureRule:
    """One user rule. Signals may be given by number or name (9, "SIGKILL", "KILL")."""

    name: str
    action: FailureAction
    exit_codes: tuple[int, ...] = ()
    signals: tuple[int | str, ...] = ()
    reasons: tuple[str, ...] = ()
    message_pattern: str | None = None  # searched in the classification message and the failing ranks' logs
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("name: must not be empty")
        try:
            self.action = FailureAction(self.action)
        except ValueError:
            choices = ", ".join(a.value for a in FailureAction)
            raise ValueError(f"action: expected one of {choices}, got {self.action!r}") from None
        self.exit_codes = tuple(self.exit_codes)
        if bad := [c for c in self.exit_codes if not 0 <= c <= 255]:
            raise ValueError(f"exit_codes: must be in 0..255, got {bad[0]}")
        self.signals = tuple(parse_signal(s) for s in self.signals)
        self.reasons = tuple(self.reasons)
        known = {c.value for c in ExitClass if c not in FINAL_CLASSES and c is not ExitClass.USER_ERROR}
        if bad := [r for r in self.reasons if r not in known]:
            raise ValueError(f"reasons: unknown reason {bad[0]!r} (one of {', '.join(sorted(known))})")
        if self.message_pattern is not None:
            try:
                self._regex = re.compile(self.message_pattern)
            except re.error as e:
                raise ValueError(f"message_pattern: invalid regular expression: {e}") from None
        if not (self.exit_codes or self.signals or self.reasons or self._regex):
            raise ValueError(f"{self.name}: a rule needs exit_codes, signals, reasons or message_pattern")

    def matches(self, end: AttemptEnd, default: Classification) -> bool:
        failing = [r for r in end.ranks if r.failed]
        if self.exit_codes and not any(r.exit_code in self.exit_codes for r in failing):
            return False
        if self.signals and not any(r.term_signal in self.signals for r in failing):
            return False
        if self.reasons and default.reason not in self.reasons:
            return False
        if self._regex is not None:
            texts = [default.message, *(r.log_tail for r in failing)]
            return any(self._regex.search(t) for t in texts)
        return True


def parse_signal(value: int | str) -> int:
    if isinstance(value, int):
        if not 1 <= value <= MAX_SIGNAL:
            raise ValueError(f"signals: must be in 1..{MAX_SIGNAL}, got {value}")
        return value
    name = value.strip().upper()
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        raise ValueError(f"signals: unknown signal {value!r}") from None


def classify(end: AttemptEnd, rules: Sequence[FailureRule] = ()) -> Classification:
    default = classify_default(end)
    if default.exit_class in FINAL_CLASSES:
        return default
    for rule in rules:
        if rule.matches(end, default):
            return replace(
                default,
                retryable=rule.action.retryable,
                counts_toward_limit=rule.action.counts_toward_limit,
                rule=rule.name,
                message=f"{default.message} (rule {rule.name}: {rule.action.value})",
            )
    return default


def classify_default(end: AttemptEnd) -> Classification:
    for rule in DEFAULT_RULES:
        if (result := rule(end)) is not None:
            return result
    raise AssertionError("the last default rule always matches")


# ------------------------------------------------------------------------------------------- default rules


def _result(
    end: AttemptEnd, cls: ExitClass, message: str, *, retry: bool, count: bool, ranks: Sequence[int] = ()
) -> Classification:
    return Classification(cls, message, retry, retry and count, end.last_step, tuple(ranks))


def _cancelled(end: AttemptEnd) -> Classification | None:
    if end.cancelled:
        return _result(end, ExitClass.CANCELLED, "cancelled by the user", retry=False, count=False)
    return None


def _straggler_excluded(end: AttemptEnd) -> Classification | None:
    if end.excluded_node is not None:
        message = f"stopped to exclude straggler node {end.excluded_node}"
        return _result(end, ExitClass.STRAGGLER_EXCLUDED, message, retry=True, count=False)
    return None


def _succeeded(end: AttemptEnd) -> Classification | None:
    hung = end.hang is not None and end.hang.hung
    if end.ranks and all(r.exit_code == 0 and r.signal is None for r in end.ranks) and not hung:
        return _result(end, ExitClass.SUCCEEDED, "every rank exited with code 0", retry=False, count=False)
    return None


def _hang(end: AttemptEnd) -> Classification | None:
    if end.hang is not None and end.hang.hung:
        ranks = end.hang.first_stalled
        return _result(end, ExitClass.HANG, end.hang.message, retry=True, count=True, ranks=ranks)
    return None


def _node_lost(end: AttemptEnd) -> Classification | None:
    if end.lost_nodes:
        ranks = [r.rank for r in end.ranks if r.node in end.lost_nodes]
        message = f"lost node{'s' if len(end.lost_nodes) > 1 else ''} {', '.join(end.lost_nodes)}"
        return _result(end, ExitClass.NODE_LOST, message, retry=True, count=False, ranks=ranks)
    return None


def _config_error(end: AttemptEnd) -> Classification | None:
    bad = culprits([r for r in end.ranks if r.exit_code == EXIT_USER_ERROR and r.signal is None])
    if bad:
        return _result(
            end, ExitClass.CONFIG_ERROR, describe(bad), retry=False, count=False, ranks=ranks_of(bad)
        )
    return None


def _storage_unavailable(end: AttemptEnd) -> Classification | None:
    """The trainer's EXIT_STORAGE_UNAVAILABLE: its checkpoint storage stayed unwritable for
    checkpoint.storage_outage_seconds while it kept training and retried the save with backoff. Not retryable
    (and so never a CrashLoop): the trainer has already waited as long as the job allows, and a restart would
    resume from the last commit and recompute the steps since, to fail at the same storage. The message quotes
    the rank's line naming the path; a user rule (reasons: [StorageUnavailable]) can still ask for a retry."""
    bad = culprits([r for r in end.ranks if r.exit_code == EXIT_STORAGE_UNAVAILABLE and r.signal is None])
    if not bad:
        return None
    lines = [line.strip() for line in bad[0].log_tail.splitlines() if STORAGE_UNAVAILABLE in line]
    line = lines[-1][lines[-1].index(STORAGE_UNAVAILABLE) :] if lines else STORAGE_UNAVAILABLE
    message = f"rank {bad[0].rank}{f' ({bad[0].node})' if bad[0].node else ''}: {line}"
    return _result(end, ExitClass.STORAGE_UNAVAILABLE, message, retry=False, count=False, ranks=ranks_of(bad))


def _preempted(end: AttemptEnd) -> Classification | None:
    failing = [r for r in end.ranks if r.failed]
    if end.preempted:
        return _result(end, ExitClass.PREEMPTED, "preempted by the backend", retry=True, count=False)
    if failing and all(r.stopped_gracefully for r in failing):
        message = f"stopped on SIGTERM: {describe(culprits(failing))}"
        return _result(end, ExitClass.PREEMPTED, message, retry=True, count=False, ranks=ranks_of(failing))
    return None


def _out_of_memory(end: AttemptEnd) -> Classification | None:
    oom = culprits([r for r in end.ranks if r.out_of_memory and (r.failed or r.oom_killed)])
    if oom:
        message = f"out of memory: {describe(oom)}"
        return _result(end, ExitClass.OOM, message, retry=True, count=True, ranks=ranks_of(oom))
    return None


def _crash(end: AttemptEnd) -> Classification | None:
    failing = culprits([r for r in end.ranks if r.failed])
    if not failing:
        return None
    if not end.progressed:
        message = f"crashed before the first step: {describe(failing)}"
        cls = ExitClass.CRASH_BEFORE_FIRST_STEP
    else:
        message, cls = describe(failing), ExitClass.CRASH
    return _result(end, cls, message, retry=True, count=True, ranks=ranks_of(failing))


def _unknown(end: AttemptEnd) -> Classification:
    message = "the attempt ended without a failing rank or a success"
    return _result(end, ExitClass.UNKNOWN, message, retry=True, count=True)


DEFAULT_RULES: tuple[Callable[[AttemptEnd], Classification | None], ...] = (
    _cancelled,
    _straggler_excluded,
    _succeeded,
    _node_lost,
    _hang,
    _config_error,
    _storage_unavailable,
    _preempted,
    _out_of_memory,
    _crash,
    _unknown,
)


def culprits(failing: Sequence[RankExit]) -> list[RankExit]:
    """Ranks stopped the graceful way were most likely stopped because of the others: they go last."""
    return sorted(
        failing,
        key=lambda r: (
            r.stopped_gracefully,
            not r.root_cause,
            r.exited_at if r.exited_at is not None else float("inf"),
            r.rank,
        ),
    )


def ranks_of(exits: Sequence[RankExit]) -> list[int]:
    return [r.rank for r in exits]


def describe(exits: Sequence[RankExit]) -> str:
    """'rank 3 (local-1) exited with code 1: ValueError: boom' for the first culprit, and how many more."""
    first = exits[0]
    where = f" ({first.node})" if first.node else ""
    sig = first.term_signal
    if first.agent:
        # The agent's death took the rank with it: the node is what failed, and the rank never reported.
        how = (
            f"was killed by {signal_name(sig)}" if sig is not None else f"exited with code {first.exit_code}"
        )
        text = f"the torchrun agent of {first.node or 'its node'} (rank {first.rank}) {how}"
        if len(exits) > 1:
            text += f"; {len(exits) - 1} more rank{'s' if len(exits) > 2 else ''} failed"
        return text
    if sig is not None:
        how = f"was killed by {signal_name(sig)}"
    else:
        how = f"exited with code {first.exit_code}"
        if first.exit_code == EXIT_FAULT_CRASH:
            how += " (injected crash)"
        elif first.exit_code == EXIT_USER_ERROR:
            how += " (invalid configuration)"
    text = f"rank {first.rank}{where} {how}"
    # A process killed by a signal wrote nothing about it: its log's last line is unrelated (an OOM aside).
    line = last_line(first.log_tail)
    if line and (sig is None or OOM_LOG_PATTERN.search(line)):
        text += f": {line}"
    if len(exits) > 1:
        text += f"; {len(exits) - 1} more rank{'s' if len(exits) > 2 else ''} failed"
    return text


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def last_line(log_tail: str, limit: int = 200) -> str:
    """The error line of a traceback is its last non-empty line; an OOM message wins wherever it is."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    oom = [line for line in lines if OOM_LOG_PATTERN.search(line)]
    line = (oom or lines or [""])[-1]
    return line if len(line) <= limit else line[: limit - 3] + "..."
