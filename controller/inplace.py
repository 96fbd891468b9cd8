"""The controller's part in in-place recovery (`fault_tolerance.recovery: in-place`; the ranks' part is
trainer/recovery/).

When a node of a gang fails, the other nodes' ranks stay: the reconciler asks the attempt's recovery coordinator
(an HTTP API; the controller never imports torch) to give the lost node's ranks to a hot spare node whose
processes all wait, promotes that spare into the lost node's place in the gang, records the decision and starts
a new spare. The coordinator's status then shows when every rank joined the new round and from which step it
resumed: the recovery's phases (detect, regroup, restore, first step) and the steps lost go into an event.

This module holds the decisions and the timings, pure, and the coordinator's client; the reconciler does the I/O
around them.

Decisions:

- A whole spare node for a lost node, its members in local-rank order: the ring keeps a node's ranks' replicas
  on the next node, so a lost node's ranks come back from there, and a spare node's processes share a machine
  the way the lost ones did.
- A spare still starting (importing torch, building its model): the survivors wait in place for it, up to
  `spare_wait_seconds`: SPARE_READY_WAIT_S, or longer where this attempt's own start-up took longer. No spare
  at all, no coordinator, or it refuses: the restart path, as without in-place recovery, and an
  InPlaceRecoveryDeclined event says why. The ranks themselves fall back too (EXIT_RECOVERY_FALLBACK) when some
  state is in no memory.
"""

from __future__ import annotations

import enum
import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

COORDINATOR_TIMEOUT_S = 5.0
# How long a lost node's ranks wait in place for a spare that is still starting (importing torch, building its
# model) before the attempt restarts instead: about twice a spare's start-up on a loaded 2-core machine.
SPARE_READY_WAIT_S = 60.0


def spare_wait_seconds(*, launched_at: float, first_step_at: float | None, limit: float) -> float:
    """How long a lost node's ranks wait in place for a spare still starting: SPARE_READY_WAIT_S, or as long as
    this attempt took from its launch to its first step when that was longer (a spare goes through the same
    start-up: scheduling, the interpreter, torch, the model; the attempt's also held a checkpoint load and a
    first step, so it is the longer of the two), at most `limit` (the start-up timeout). At scale start-up takes
    minutes: with a fixed 60 s the fleet simulator saw a failure within a minute or so of a recovery find the
    new spare still starting and take the restart path, 1-4 times per 54-day run at 16,384 GPUs, each costing a
    restart where the spare was seconds away. Waiting a start-up's length costs no more than the restart would."""
    startup = first_step_at - launched_at if first_step_at is not None else 0.0
    return min(max(SPARE_READY_WAIT_S, startup), max(limit, SPARE_READY_WAIT_S))


class CoordinatorError(RuntimeError):
    pass


class InPlace(enum.Enum):
    """What the controller made of a lost node under `recovery: in-place`."""

    RECOVERING = "recovering"  # its ranks went to a spare
    AWAITING_SPARE = "awaiting-spare"  # the survivors wait for a spare still starting
    DECLINED = "declined"  # the restart path handles it


@dataclass(frozen=True, slots=True)
class CoordinatorClient:
    url: str
    timeout_s: float = COORDINATOR_TIMEOUT_S

    def status(self) -> dict[str, Any]:
        return self._call("/v1/status", None)

    def replace(self, ranks: Sequence[int], *, failed_round: int, members: Sequence[str]) -> dict[str, Any]:
        return self._call(
            "/v1/replace", {"ranks": list(ranks), "failed_round": failed_round, "members": list(members)}
        )

    def _call(self, path: str, body: Mapping[str, Any] | None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            try:
                detail = json.loads(err.read()).get("error", "")
            except ValueError:
                detail = ""
            raise CoordinatorError(f"{path}: HTTP {err.code}: {detail}") from err
        except (OSError, ValueError) as err:
            raise CoordinatorError(f"{path}: {type(err).__name__}: {err}") from err


@dataclass(frozen=True, slots=True)
class Replacement:
    node: str  # the lost node
    spare: str  # the spare node that takes its place
    ranks: tuple[int, ...]
    members: tuple[str, ...]  # the spare's processes, in local-rank order (one per rank)


def plan_replacement(
    *,
    failed: Sequence[str],
    nodes: Sequence[str],
    procs_per_node: int,
    live_spares: Sequence[str],
    waiting: Sequence[str],
) -> Replacement | None:
    """The spare node for the one failed node: its every process waiting. None when more than one node failed at
    once (their replicas may be lost with them: the restart path decides) or no spare node is ready."""
    if len(failed) != 1 or failed[0] not in nodes:
        return None
    node = failed[0]
    first = nodes.index(node) * procs_per_node
    ready = set(waiting)
    for spare in live_spares:
        members = tuple(f"{spare}/{i}" for i in range(procs_per_node))
        if all(m in ready for m in members):
            return Replacement(node, spare, tuple(range(first, first + procs_per_node)), members)
    return None


def adopted_replacement(
    status: Mapping[str, Any],
    *,
    failed: Sequence[str],
    nodes: Sequence[str],
    procs_per_node: int,
    spares: Sequence[str],
    known_rounds: Sequence[int],
) -> tuple[Replacement, Mapping[str, Any]] | None:
    """The replacement the coordinator already made for the failed node and this controller does not know of
    (a controller killed between asking for it and recording it): the newest round gives exactly the node's
    ranks to the processes of one spare node that is still a spare here. With it and that round's status; None
    otherwise (then a new decision is made). Finishing it, instead of asking again, keeps one process per rank:
    a second spare given the same ranks would leave the first one in a round of its own."""
    rounds = status.get("rounds") or []
    if len(failed) != 1 or failed[0] not in nodes or not rounds:
        return None
    newest = rounds[-1]
    if int(newest["round"]) == 0 or int(newest["round"]) in known_rounds:
        return None
    first = nodes.index(failed[0]) * procs_per_node
    ranks = tuple(range(first, first + procs_per_node))
    if tuple(sorted(int(r) for r in newest["replaced"])) != ranks:
        return None
    assignments = {str(m): int(r) for m, r in newest["assignments"].items()}
    for spare in spares:
        members = tuple(f"{spare}/{i}" for i in range(procs_per_node))
        if all(assignments.get(m) == rank for m, rank in zip(members, ranks, strict=True)):
            return Replacement(failed[0], spare, ranks, members), newest
    return None


def steps_done(round_status: Mapping[str, Any]) -> int | None:
    """The most steps any rank of a round reported having completed before it went back (None: no report)."""
    done = [int(v["done"]) for v in round_status.get("resumed", {}).values() if v.get("done") is not None]
    return max(done, default=None)


def unfinished_recovery(
    started: Sequence[Mapping[str, Any]], recovered_rounds: Sequence[int]
) -> dict[str, Any] | None:
    """The recovery a previous controller of the attempt decided and did not see finish, from its events' data
    (InPlaceRecoveryStarted, in order; the rounds of RecoveredInPlace): the newest round started after the
    last one recovered, its outage counted from the first failure since then. None when every one finished."""
    last = max(recovered_rounds, default=0)
    open_ = [d for d in started if int(d["round"]) > last]
    if not open_:
        return None
    newest = open_[-1]
    died = [float(d["died_at"]) for d in open_ if d.get("died_at") is not None]
    return {
        "round": int(newest["round"]),
        "node": newest["node"],
        "spare": newest["spare"],
        "ranks": list(newest["ranks"]),
        "died_at": min(died) if died else None,
        "decided_at": float(newest.get("decided_at") or 0.0),
    }


def in_place_crash_loop(failure_steps: Sequence[int], step: int | None, *, limit: int) -> bool:
    """Whether a failure seen at `step` would be the `limit`-th at that step among the attempt's finished in-place
    recoveries (`failure_steps`: the newest reported step when each one's failure was seen): a crash that
    recovery keeps bringing back, for the restart path's own crash-loop guard. Failures at other steps are the
    ordinary ones of a long run, however many."""
    return step is not None and list(failure_steps).count(step) >= limit - 1


def starting_spares(*, live_spares: Sequence[str], waiting: Sequence[str], procs_per_node: int) -> list[str]:
    """Spare nodes alive whose processes do not all wait yet (still starting)."""
    ready = set(waiting)
    return [s for s in live_spares if not all(f"{s}/{i}" in ready for i in range(procs_per_node))]


def hung_node(first_stalled: Sequence[int], *, nodes: Sequence[str], procs_per_node: int) -> str | None:
    """The one node that holds every rank that stopped first in a hang (the likely culprits), whose ranks can be
    killed and replaced in place; None when the culprits span nodes or are unknown (the restart path decides)."""
    held = {rank // procs_per_node for rank in first_stalled}
    if len(held) != 1:
        return None
    index = held.pop()
    return nodes[index] if 0 <= index < len(nodes) else None


@dataclass(frozen=True, slots=True)
class RecoveryTimes:
    detect_s: float | None  # the node's end -> the controller's decision
    regroup_s: float  # the round opened -> the last rank joined it
    restore_s: float  # the last join -> the last rank resumed from its snapshot
    step: int  # the step every rank went back to (steps completed)
    steps_lost: int | None  # completed steps done again: the most any survivor had done, less `step`
    resumed_at: float  # unix seconds: the last rank back at `step`


def recovery_times(
    round_status: Mapping[str, Any],
    *,
    died_at: float | None,
    decided_at: float,
    done_before: int | None = None,
) -> RecoveryTimes | None:
    """The phases of a recovery from its round in the coordinator's status; None until every rank resumed.
    `done_before`: the most steps a rank had completed when an earlier round, superseded by this one before it
    resumed, was opened (its ranks then went back once already, and this round's reports start from there)."""
    joined = [float(v["time"]) for v in round_status.get("joined", {}).values()]
    resumed = round_status.get("resumed", {})
    if not joined or not resumed or len(resumed) < len(joined):
        return None
    steps = {int(v["step"]) for v in resumed.values()}
    done = [int(v["done"]) for v in resumed.values() if v.get("done") is not None]
    if done_before is not None:
        done.append(done_before)
    last_join, last_resume = max(joined), max(float(v["time"]) for v in resumed.values())
    return RecoveryTimes(
        detect_s=None if died_at is None else max(decided_at - died_at, 0.0),
        regroup_s=max(last_join - float(round_status["opened_at"]), 0.0),
        restore_s=max(last_resume - last_join, 0.0),
        step=min(steps),
        steps_lost=max(max(done) - min(steps), 0) if done else None,
        resumed_at=last_resume,
    )
