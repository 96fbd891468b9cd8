"""A running attempt's numbers from its ranks' states: the one definition of a job's step and loss."""

from __future__ import annotations

from controller.ingest import RankState
from controller.supervision import step_progress


def test_step_progress_is_the_slowest_ranks_steps_done_and_the_mean_loss_at_that_step() -> None:
    ranks = [
        RankState(rank=0, attempt=1, step=7, loss=1.0),  # ahead: not the job's step
        RankState(rank=1, attempt=1, step=6, loss=3.0),
        RankState(rank=2, attempt=1, step=6, loss=2.0),
        RankState(rank=3, attempt=1, step=6),  # no finite loss: not averaged
        RankState(rank=4, attempt=1),  # not reported a step yet
    ]
    assert step_progress(ranks) == (7, 2.5)  # step index 6 done by every rank: 7 steps
    assert step_progress([RankState(rank=0, attempt=1, step=0)]) == (1, None)
    assert step_progress([RankState(rank=0, attempt=1)]) == (None, None)
