"""The controller's in-place recovery decisions (controller/inplace.py): which spare takes a lost node, and the
phases of a finished recovery read from the coordinator's status."""

from __future__ import annotations

from controller.inplace import (
    CoordinatorClient,
    CoordinatorError,
    Replacement,
    adopted_replacement,
    hung_node,
    in_place_crash_loop,
    plan_replacement,
    recovery_times,
    steps_done,
    unfinished_recovery,
)


def test_a_lost_node_goes_to_the_first_spare_node_whose_every_process_waits() -> None:
    plan = plan_replacement(
        failed=["local-1"],
        nodes=["local-0", "local-1", "local-2"],
        procs_per_node=2,
        live_spares=["s-0", "s-1"],
        waiting=["s-0/0", "s-1/0", "s-1/1"],  # s-0's second process is still importing torch
    )
    assert plan == Replacement("local-1", "s-1", (2, 3), ("s-1/0", "s-1/1"))


def test_no_plan_without_a_ready_spare_or_for_two_nodes_at_once() -> None:
    common = {"nodes": ["local-0", "local-1"], "procs_per_node": 1}
    assert plan_replacement(failed=["local-1"], live_spares=[], waiting=["s-0/0"], **common) is None
    assert plan_replacement(failed=["local-1"], live_spares=["s-0"], waiting=[], **common) is None
    assert (
        plan_replacement(
            failed=["local-0", "local-1"], live_spares=["s-0", "s-1"], waiting=["s-0/0", "s-1/0"], **common
        )  # fmt: skip
        is None
    )
    assert plan_replacement(failed=["elsewhere"], live_spares=["s-0"], waiting=["s-0/0"], **common) is None


def test_recovery_times_wait_for_every_rank_and_count_the_steps_done_again() -> None:
    round_ = {
        "opened_at": 100.0,
        "joined": {"0": {"time": 100.02}, "1": {"time": 100.05}},
        "resumed": {"0": {"time": 101.5, "step": 5, "done": 6}},
    }
    assert recovery_times(round_, died_at=99.9, decided_at=99.95) is None  # rank 1 has not resumed
    round_["resumed"]["1"] = {"time": 101.55, "step": 5, "done": None}  # the newcomer
    times = recovery_times(round_, died_at=99.9, decided_at=99.95)
    assert times is not None
    assert round(times.detect_s, 3) == 0.05 and round(times.regroup_s, 3) == 0.05
    assert round(times.restore_s, 3) == 1.5 and times.step == 5 and times.steps_lost == 1
    assert recovery_times(round_, died_at=None, decided_at=99.95).detect_s is None


def test_the_client_names_the_path_and_the_cause_when_the_coordinator_is_gone() -> None:
    client = CoordinatorClient("http://127.0.0.1:9", timeout_s=1)  # the discard port: nothing listens
    try:
        client.status()
    except CoordinatorError as err:
        assert str(err).startswith("/v1/status: ")
    else:
        raise AssertionError("no error")


def test_a_hang_is_replaced_in_place_only_when_its_first_stalled_ranks_share_one_node() -> None:
    nodes = ["local-0", "local-1", "local-2"]
    assert hung_node([3], nodes=nodes, procs_per_node=2) == "local-1"
    assert hung_node([2, 3], nodes=nodes, procs_per_node=2) == "local-1"
    assert hung_node([1, 2], nodes=nodes, procs_per_node=2) is None  # two nodes: which one is at fault?
    assert hung_node([], nodes=nodes, procs_per_node=2) is None
    assert hung_node([9], nodes=nodes, procs_per_node=2) is None


def _round(k: int, replaced: list[int], assignments: dict[str, int], **reports) -> dict:
    return {"round": k, "replaced": replaced, "assignments": assignments, "opened_at": 100.0 + k, **reports}


def test_a_replacement_the_coordinator_made_for_a_dead_controller_is_finished_not_asked_again() -> None:
    """The controller was killed after the coordinator opened round 1 for local-1 and before it recorded the
    promotion: the next controller finds the round, and the spare it names is still a spare in its record."""
    status = {"round": 1, "rounds": [_round(0, [], {}), _round(1, [2, 3], {"s-1/0": 2, "s-1/1": 3})]}
    common = {"nodes": ["local-0", "local-1"], "procs_per_node": 2}
    found = adopted_replacement(status, failed=["local-1"], spares=["s-0", "s-1"], known_rounds=[], **common)
    assert found is not None
    plan, opened = found
    assert plan == Replacement("local-1", "s-1", (2, 3), ("s-1/0", "s-1/1")) and opened["round"] == 1
    # Not when this controller made it, for another node, for a spare no longer a spare, or before any failure.
    assert adopted_replacement(status, failed=["local-1"], spares=["s-1"], known_rounds=[1], **common) is None
    assert adopted_replacement(status, failed=["local-0"], spares=["s-1"], known_rounds=[], **common) is None
    assert adopted_replacement(status, failed=["local-1"], spares=["s-0"], known_rounds=[], **common) is None
    first = {"round": 0, "rounds": [_round(0, [], {})]}
    assert adopted_replacement(first, failed=["local-1"], spares=["s-1"], known_rounds=[], **common) is None


def test_a_recovery_left_unfinished_by_a_dead_controller_is_followed_from_its_first_failure() -> None:
    started = [
        {"round": 1, "node": "n-1", "spare": "s-0", "ranks": [1], "died_at": 10.0, "decided_at": 10.5},
        {"round": 2, "node": "s-0", "spare": "s-1", "ranks": [1], "died_at": 12.0, "decided_at": 12.2},
    ]
    pending = unfinished_recovery(started, recovered_rounds=[])
    assert pending == {
        "round": 2, "node": "s-0", "spare": "s-1", "ranks": [1], "died_at": 10.0, "decided_at": 12.2
    }  # fmt: skip
    assert unfinished_recovery(started, recovered_rounds=[2]) is None
    assert unfinished_recovery(started[:1], recovered_rounds=[]) is not None


def test_a_superseded_round_counts_the_steps_its_ranks_had_done() -> None:
    """Round 1's newcomer was lost while restoring: the survivor had done 6 steps and went back to 5; round 2
    then resumes from 5 with the survivor reporting 5 done. One step was lost, not none."""
    superseded = _round(1, [1], {"s-0/0": 1}, resumed={"0": {"time": 1.0, "step": 5, "done": 6}})
    assert steps_done(superseded) == 6 and steps_done(_round(0, [], {})) is None
    round2 = _round(
        2, [1], {"s-1/0": 1},
        joined={"0": {"time": 103.0}, "1": {"time": 103.5}},
        resumed={"0": {"time": 104.0, "step": 5, "done": 5}, "1": {"time": 104.1, "step": 5}},
    )  # fmt: skip
    assert recovery_times(round2, died_at=90.0, decided_at=101.0).steps_lost == 0
    assert recovery_times(round2, died_at=90.0, decided_at=101.0, done_before=6).steps_lost == 1


def test_a_failure_brought_back_at_the_same_step_is_a_crash_loop_only_at_the_limit() -> None:
    """Two finished recoveries of failures seen at step 7: a third there goes to the restart path (limit 3); a
    long run's failures at different steps never do."""
    assert not in_place_crash_loop([7], 7, limit=3)
    assert in_place_crash_loop([7, 7], 7, limit=3)
    assert not in_place_crash_loop([3, 7, 11, 15, 19], 23, limit=3)
    assert not in_place_crash_loop([7, 7], None, limit=3)  # no step reported yet: nothing to compare


def test_the_wait_for_a_starting_spare_is_a_start_up_long_at_least_a_minute() -> None:
    from controller.inplace import SPARE_READY_WAIT_S, spare_wait_seconds

    # A job that started in 20 s: the minute stands. One that took 4 minutes (scheduling 2,048 nodes, loading
    # the model): a spare takes about as long, and a restart would too, so the ranks wait that long for it.
    assert spare_wait_seconds(launched_at=100.0, first_step_at=120.0, limit=1800.0) == SPARE_READY_WAIT_S
    assert spare_wait_seconds(launched_at=100.0, first_step_at=340.0, limit=1800.0) == 240.0
    assert spare_wait_seconds(launched_at=100.0, first_step_at=None, limit=1800.0) == SPARE_READY_WAIT_S
    # at most the start-up limit
    assert spare_wait_seconds(launched_at=0.0, first_step_at=5000.0, limit=1800.0) == 1800.0
