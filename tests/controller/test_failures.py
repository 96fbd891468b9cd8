"""Failure classification: each class from its evidence, the order of the default rules when evidence overlaps,
and user rules on top."""

from __future__ import annotations

import signal

import pytest

from controller.failures import (
    AttemptEnd,
    ExitClass,
    FailureAction,
    FailureRule,
    RankExit,
    classify,
    last_line,
)
from controller.hangs import HangVerdict, StaleRank
from trainer.contract.telemetry import EXIT_FAULT_CRASH, EXIT_PREEMPTED

TRACEBACK = (
    'Traceback (most recent call last):\n  File "train.py", line 9\n    step()\nValueError: bad batch\n'
)
OOM_TAIL = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"


def ok(rank: int) -> RankExit:
    return RankExit(rank=rank, node=f"local-{rank // 2}", exit_code=0)


def ex(rank: int, code: int | None = None, *, rc: int | None = None, **kw) -> RankExit:
    if rc is not None:
        return RankExit.from_returncode(rank, rc, node=f"local-{rank // 2}", **kw)
    return RankExit(rank=rank, node=f"local-{rank // 2}", exit_code=code, **kw)


def end(*ranks: RankExit, last_step: int | None = 120, **kw) -> AttemptEnd:
    return AttemptEnd(ranks=ranks, last_step=last_step, **kw)


def hang_verdict(hung: bool = True) -> HangVerdict:
    stale = StaleRank(rank=2, node="local-1", step=120, since=100.0, seconds=700.0, progressed=True)
    return HangVerdict(
        hung=hung,
        phase="training",
        threshold_seconds=600,
        since=101.0,
        idle_seconds=699.0,
        stale=(stale,),
        first_stalled=(2,),
    )


def test_succeeded():
    c = classify(end(ok(0), ok(1)))
    assert c.exit_class is ExitClass.SUCCEEDED and c.reason == "Succeeded"
    assert not c.retryable and not c.counts_toward_limit and c.step == 120


def test_crash_names_the_first_rank_to_fail_and_its_error_line():
    c = classify(
        end(
            ok(0),
            ex(1, 1, exited_at=50.0, log_tail=TRACEBACK),
            ex(2, rc=-9, exited_at=51.0),
            ex(3, EXIT_PREEMPTED),
        )
    )
    assert c.exit_class is ExitClass.CRASH and c.retryable and c.counts_toward_limit
    assert c.ranks == (1, 2, 3)  # the graceful stop (collateral of our teardown) goes last
    assert c.message == "rank 1 (local-0) exited with code 1: ValueError: bad batch; 2 more ranks failed"
    assert c.step == 120 and c.rule == ""


def test_sigkill_of_one_rank_is_a_crash_and_the_injected_crash_says_so():
    c = classify(end(ok(0), ex(1, rc=-signal.SIGKILL)))
    assert c.exit_class is ExitClass.CRASH and "killed by SIGKILL" in c.message
    c = classify(end(ex(0, EXIT_FAULT_CRASH), ok(1)))
    assert c.exit_class is ExitClass.CRASH and "code 97 (injected crash)" in c.message


def test_crash_before_the_first_step():
    c = classify(end(ex(0, 1, log_tail=TRACEBACK), ex(1, 1), last_step=None))
    assert c.exit_class is ExitClass.CRASH_BEFORE_FIRST_STEP and c.step is None
    assert c.retryable and c.counts_toward_limit and "before the first step" in c.message
    # A micro-step counts as progress even when no full step completed.
    assert classify(end(ex(0, 1), last_step=None, progressed=True)).exit_class is ExitClass.CRASH


def test_config_error_is_not_retried_and_wins_over_a_crash():
    c = classify(end(ex(0, 2, log_tail="error: data.path: no such file\n"), ex(1, 1), last_step=None))
    assert c.exit_class is ExitClass.CONFIG_ERROR and c.ranks == (0,)
    assert not c.retryable and not c.counts_toward_limit
    assert "invalid configuration" in c.message and "data.path" in c.message


@pytest.mark.parametrize(
    "rank_exit",
    [
        RankExit(rank=0, exit_code=137, oom_killed=True),  # Kubernetes OOMKilled
        RankExit(rank=0, exit_code=1, log_tail=TRACEBACK + OOM_TAIL),
        RankExit.from_returncode(0, -6, log_tail="RuntimeError: HIP out of memory\n"),
    ],
)
def test_out_of_memory(rank_exit):
    c = classify(end(rank_exit, ex(1, EXIT_PREEMPTED)))
    assert c.exit_class is ExitClass.OOM and c.reason == "OutOfMemory" and c.ranks == (0,)
    assert c.retryable and c.counts_toward_limit


def test_oom_message_quotes_the_oom_line_not_the_last_line():
    c = classify(end(ex(0, 1, log_tail=OOM_TAIL + "Exception ignored in atexit\n")))
    assert "CUDA out of memory" in c.message


def test_plain_kill_9_without_the_oom_flag_is_a_crash():
    assert classify(end(ex(0, 137))).exit_class is ExitClass.CRASH


def test_preempted_by_the_backend_or_by_sigterm_alone_does_not_count():
    c = classify(end(ex(0, rc=-9), ex(1, rc=-9), preempted=True))
    assert c.exit_class is ExitClass.PREEMPTED and c.retryable and not c.counts_toward_limit
    c = classify(end(ex(0, EXIT_PREEMPTED), ex(1, rc=-signal.SIGTERM), ok(2)))
    assert c.exit_class is ExitClass.PREEMPTED and c.ranks == (0, 1)


def test_hang_wins_over_the_kills_that_ended_it():
    c = classify(end(ex(0, rc=-9), ex(1, rc=-9), ex(2, rc=-9), hang=hang_verdict()))
    assert c.exit_class is ExitClass.HANG and c.ranks == (2,) and c.counts_toward_limit
    assert "no rank made progress" in c.message
    # A verdict that is not a hang is no evidence.
    assert classify(end(ok(0), hang=hang_verdict(hung=False))).exit_class is ExitClass.SUCCEEDED


def test_node_lost_does_not_count_and_wins_over_the_crashes_it_caused():
    c = classify(
        end(ex(0, 1, log_tail="NCCL error: remote process exited"), ex(2), ex(3), lost_nodes=("local-1",))
    )
    assert c.exit_class is ExitClass.NODE_LOST and c.ranks == (2, 3)
    assert c.retryable and not c.counts_toward_limit and c.message == "lost node local-1"


def test_controller_initiated_ends_come_first():
    killed = (ex(0, rc=-15), ex(1, rc=-9))
    c = classify(end(*killed, cancelled=True, hang=hang_verdict()))
    assert c.exit_class is ExitClass.CANCELLED and not c.retryable
    c = classify(end(*killed, excluded_node="local-0", hang=hang_verdict()))
    assert c.exit_class is ExitClass.STRAGGLER_EXCLUDED and c.retryable and not c.counts_toward_limit
    assert "local-0" in c.message


def test_rule_order_when_evidence_overlaps():
    oom_and_config = end(ex(0, 2), ex(1, 1, log_tail=OOM_TAIL))
    assert classify(oom_and_config).exit_class is ExitClass.CONFIG_ERROR
    oom_before_start = end(ex(0, 1, log_tail=OOM_TAIL), last_step=None)
    assert classify(oom_before_start).exit_class is ExitClass.OOM
    preempted_and_crash = end(ex(0, EXIT_PREEMPTED), ex(1, 1))
    assert classify(preempted_and_crash).exit_class is ExitClass.CRASH
    lost_and_hung = end(ex(0, rc=-9), lost_nodes=("local-0",), hang=hang_verdict())
    assert classify(lost_and_hung).exit_class is ExitClass.NODE_LOST  # the survivors hung waiting for it
    hung_and_crashed = end(ex(0, 1, log_tail=TRACEBACK), ex(1, rc=-9), hang=hang_verdict())
    assert classify(hung_and_crashed).exit_class is ExitClass.HANG


def test_no_evidence_is_unknown_and_retried():
    c = classify(end(ok(0), ex(1, None)))
    assert c.exit_class is ExitClass.UNKNOWN and c.retryable and c.counts_toward_limit


def test_user_rules_first_match_sets_the_action():
    rules = [
        FailureRule(name="nccl-flake", action="ignore-for-limit", message_pattern=r"NCCL (error|timeout)"),
        FailureRule(name="exit-3", action=FailureAction.FAIL, exit_codes=(3,)),
        FailureRule(name="any-crash", action="fail", reasons=("Crash",)),
    ]
    c = classify(end(ex(0, 1, log_tail="RuntimeError: NCCL timeout in allreduce\n")), rules)
    assert c.exit_class is ExitClass.CRASH and c.rule == "nccl-flake"
    assert (
        c.retryable
        and not c.counts_toward_limit
        and c.message.endswith("(rule nccl-flake: ignore-for-limit)")
    )
    c = classify(end(ex(0, 3)), rules)
    assert c.rule == "exit-3" and not c.retryable
    c = classify(end(ex(0, 1)), rules)
    assert c.rule == "any-crash" and not c.retryable
    c = classify(end(ex(0, 1, log_tail=OOM_TAIL)), rules)  # OutOfMemory: no rule matches
    assert c.rule == "" and c.retryable


def test_user_rule_criteria_must_all_hold_and_never_touch_success_or_cancel():
    rule = FailureRule(name="oom-on-kill", action="fail", signals=("SIGKILL",), reasons=("OutOfMemory",))
    assert classify(end(ex(0, 137, oom_killed=True)), [rule]).rule == "oom-on-kill"
    assert classify(end(ex(0, 1, log_tail=OOM_TAIL)), [rule]).rule == ""  # OOM, but no SIGKILL
    assert classify(end(ex(0, rc=-9)), [rule]).rule == ""  # SIGKILL, but a Crash
    everything = FailureRule(name="all", action="fail", message_pattern=".*")
    assert classify(end(ok(0)), [everything]).exit_class is ExitClass.SUCCEEDED
    assert classify(end(ex(0, rc=-15), cancelled=True), [everything]).rule == ""


def test_rule_signals_by_name_or_number():
    assert FailureRule(name="a", action="retry", signals=(9, "KILL", "sigsegv")).signals == (9, 9, 11)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": " ", "action": "fail", "exit_codes": (1,)}, "name"),
        ({"name": "r", "action": "explode", "exit_codes": (1,)}, "action"),
        ({"name": "r", "action": "fail", "exit_codes": (256,)}, "exit_codes"),
        ({"name": "r", "action": "fail", "signals": ("SIGNOPE",)}, "signals"),
        ({"name": "r", "action": "fail", "signals": (0,)}, "signals"),
        ({"name": "r", "action": "fail", "reasons": ("Succeeded",)}, "reasons"),
        ({"name": "r", "action": "fail", "message_pattern": "("}, "message_pattern"),
        ({"name": "r", "action": "fail"}, "r"),
    ],
)
def test_rule_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        FailureRule(**kwargs)


def test_attempt_end_validates_and_normalises():
    with pytest.raises(ValueError, match="^last_step:"):
        AttemptEnd(ranks=(), last_step=-1)
    assert RankExit.from_returncode(0, -9) == RankExit(rank=0, exit_code=137, signal=9)
    assert RankExit(rank=0, exit_code=143).term_signal == signal.SIGTERM
    assert last_line("x" * 300).endswith("...") and len(last_line("x" * 300)) == 200
