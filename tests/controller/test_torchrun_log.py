"""Reading torchrun agents' failure summaries back, and deciding across nodes which failure came first."""

from __future__ import annotations

import time

from controller.backends.torchrun_log import WorkerExit, node_exits, parse_failures, root_causes


def _block(index: int, when: str, rank: int, local: int, code: int, pid: int) -> str:
    return (
        f"[{index}]:\n  time      : {when}\n  host      : box\n  rank      : {rank} (local_rank: {local})\n"
        f"  exitcode  : {code} (pid: {pid})\n  error_file: <N/A>\n"
    )


SUMMARY = (
    "noise before\n"
    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
    "============================================================\ntrainer.train FAILED\n"
    "------------------------------------------------------------\nFailures:\n"
    + _block(1, "2026-12-06_11:00:04", 3, 1, -15, 1234)
    + "------------------------------------------------------------\nRoot Cause (first observed failure):\n"
    + _block(0, "2026-12-06_11:00:01", 2, 0, 97, 1233)
)


def _at(text: str) -> float:
    return time.mktime(time.strptime(text, "%Y-%m-%d_%H:%M:%S"))


def test_a_summary_gives_each_failed_worker_its_own_status_root_cause_first() -> None:
    exits = parse_failures(SUMMARY)
    assert [(e.rank, e.local_rank, e.returncode, e.pid, e.root_cause) for e in exits] == [
        (2, 0, 97, 1233, True),
        (3, 1, -15, 1234, False),
    ]
    assert exits[0].time == _at("2026-12-06_11:00:01")
    assert parse_failures("no summary here") == []


def test_a_killed_agent_speaks_for_its_ranks_with_the_node_status() -> None:
    exits = node_exits([], node="local-1", code=137, first_rank=2, procs_per_node=2, finished=50.0)
    assert [(e.rank, e.returncode, e.agent, e.root_cause, e.node) for e in exits] == [
        (2, -9, True, True, "local-1"),
        (3, -9, True, False, "local-1"),
    ]


def _exit(rank: int, *, root: bool, when: float | None, agent: bool = False) -> WorkerExit:
    return WorkerExit(
        rank=rank, local_rank=rank % 2, returncode=1, pid=100 + rank, root_cause=root, time=when, agent=agent
    )


def test_the_node_that_ended_first_holds_the_root_cause() -> None:
    crashed = [_exit(2, root=True, when=100.0)]
    brought_down = [_exit(0, root=True, when=100.0)]  # same second: the agents' clocks cannot order them
    causes = root_causes([(101.5, brought_down), (101.2, crashed)])
    assert [(e.rank, e.root_cause) for e in causes] == [(2, True), (0, False)]


def test_an_agent_that_saw_its_failure_seconds_earlier_wins_over_a_peer_that_ended_sooner() -> None:
    """The crashed node's agent spent 4 s stopping its healthy local rank; its peer failed in the collective and
    ended first."""
    crashed = [_exit(2, root=True, when=100.0), _exit(3, root=False, when=104.0)]
    brought_down = [_exit(0, root=True, when=102.0), _exit(1, root=False, when=102.0)]
    causes = root_causes([(102.3, brought_down), (104.4, crashed)])
    assert [(e.rank, e.root_cause) for e in causes] == [(2, True), (0, False), (1, False), (3, False)]


def test_a_killed_agent_is_ordered_by_its_end_not_against_other_agents_clocks() -> None:
    killed = node_exits([], node="local-1", code=137, first_rank=2, procs_per_node=1, finished=200.0)
    peer = [_exit(0, root=True, when=150.0)]  # a peer agent's clock (maybe another time zone): not compared
    causes = root_causes([(201.0, peer), (200.0, killed)])
    assert [(e.rank, e.root_cause, e.agent) for e in causes] == [(2, True, True), (0, False, False)]
