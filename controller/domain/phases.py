"""The vocabulary of a job's life: phases, event types and reasons.

Pure constants with no imports from the rest of the controller, so the store's models (which type the `phase`
column with `Phase`) and the state machine (`controller.states`, which decides which changes are allowed)
can both depend on it without a cycle.

Reasons and event types are CamelCase strings in the Kubernetes style (`RanksStarted`), declared here
beside the phases they explain; other modules (failure rules, straggler detection) declare their own reasons next
to their code and the store only checks the shape (`is_camel_case`).
"""

from __future__ import annotations

import re
from enum import StrEnum


class Phase(StrEnum):
    """Where a job is. Stored as its lowercase value."""

    PENDING = "pending"  # submitted, waiting for a controller to launch it
    LAUNCHING = "launching"  # an attempt's ranks are being started
    RUNNING = "running"  # the attempt's ranks are up and stepping
    RESTARTING = "restarting"  # the attempt ended in a retryable failure; the next one waits out its backoff
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_PHASES: frozenset[Phase] = frozenset({Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED})
ACTIVE_PHASES: frozenset[Phase] = frozenset(Phase) - TERMINAL_PHASES
# Phases in which a job has live ranks that a controller must supervise.
SUPERVISED_PHASES: frozenset[Phase] = frozenset({Phase.LAUNCHING, Phase.RUNNING})


class EventType:
    """The kind of an event on a job's timeline; `reason` says why it happened."""

    PHASE_CHANGED = "PhaseChanged"  # every state-machine transition; data: {"from": ..., "to": ...}
    SUBMITTED = "Submitted"
    CHECKPOINT = "Checkpoint"
    STRAGGLER = "Straggler"
    NODE_HEALTH = "NodeHealth"
    FAILURE = "Failure"
    DECISION = "Decision"  # a policy decision with its numbers (restart cost, checkpoint interval)
    CONTROLLER = "Controller"  # which controller manages the job (lease takeovers)
    RECOVERY = "Recovery"  # in-place recovery: a lost node's ranks given to a spare, and its phases when done


class Reason:
    """Reasons for the transitions the state machine makes itself; callers pass more specific ones (the restart
    policy's `ReachedMaxRestarts` and `CrashLoop`, the failure rules' exit classes)."""

    SUBMITTED = "Submitted"
    LAUNCHED = "Launched"
    RANKS_STARTED = "RanksStarted"
    RESTART_SCHEDULED = "RestartScheduled"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


class SupervisionReason:
    """Reasons of the events the reconciler records while it supervises a job (beside the state machine's, so a
    reader of the timeline, such as `vlctl stragglers`, needs no import of the reconciler)."""

    STRAGGLER_FLAGGED = "StragglerFlagged"
    NODE_SLOW = "NodeSlow"
    EXCLUDE_DECISION = "ExcludeNodeDecision"
    STACKS_DUMPED = "StacksDumped"
    LAUNCH_INTERRUPTED = "LaunchInterrupted"
    LAUNCH_FAILED = "LaunchFailed"
    REAPED = "OrphansReaped"
    RANKS_STOPPED = "RanksStopped"
    IN_PLACE_STARTED = "InPlaceRecoveryStarted"
    RECOVERED_IN_PLACE = "RecoveredInPlace"
    SPARE_STARTED = "SpareStarted"
    HUNG_RANKS_KILLED = "HungRanksKilled"
    SPARE_LOST = "SpareLost"
    IN_PLACE_DECLINED = "InPlaceRecoveryDeclined"
    COORDINATOR_LOST = "CoordinatorLost"


_CAMEL_CASE = re.compile(r"[A-Z][A-Za-z0-9]*")


def is_camel_case(text: str) -> bool:
    return _CAMEL_CASE.fullmatch(text) is not None
