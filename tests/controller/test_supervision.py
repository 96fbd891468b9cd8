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


def test_a_window_is_recorded_per_rank_for_a_small_job_and_per_node_for_a_large_one() -> None:
    # What the dashboard's heatmap reads: every rank of a small job; a node's slowest rank and the flagged ranks
    # of a large one (16,384 ranks: 2,048 rows a window, not 16,384).
    import numpy as np

    from controller.hangs import HangConfig
    from controller.stragglers import StepBatch, StragglerConfig
    from controller.supervision import LiveAttempt

    config = StragglerConfig(window=5, warmup_steps=0, persistence=1, min_samples=3)
    for num_ranks, expected in ((8, 8), (16_384, 2_048)):
        live = LiveAttempt(job_id=1, job_name="w", attempt=1, num_ranks=num_ranks, dp=num_ranks, gang=None,
                           telemetry=None, launched_at=0.0, stragglers=config, hang=HangConfig())  # fmt: skip
        rng = np.random.default_rng(0)
        nodes = np.array([f"node-{r // 8}" for r in range(num_ranks)])
        windows = []
        for step in range(6):  # the sixth step closes the first window
            own = 1.0 + 0.01 * rng.standard_normal(num_ranks)
            own[5] *= 2.0  # rank 5 (node-0) is slow
            phases = np.full((num_ranks, 4), np.nan)
            windows += live._detector.observe(StepBatch.for_step(step, own_work_seconds=own, phase_seconds=phases,
                                                                 nodes=nodes, attempt=1))  # fmt: skip
        (window,) = windows
        rows = live.window_records(window)
        assert len(rows) == expected
        five = next(r for r in rows if r.rank == 5)
        assert five.flagged and five.node == "node-0" and five.median_own_s > 1.8
        assert five.mean_own_s > 1.8 and five.p90_own_s >= five.median_own_s and five.mean_wall_s is None
        assert sum(r.flagged for r in rows) == 1
        if num_ranks > 8:
            assert len({r.node for r in rows}) == 2_048
