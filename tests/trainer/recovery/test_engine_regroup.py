"""The engine goes on in the same processes over re-formed groups: every rank leaves its groups after a step whose
snapshot was never taken, joins a new round, rebinds the engine (new ZeRO-1 engine over the new groups, the model
kept) and restores the committed in-memory snapshot; every step's loss then equals the uninterrupted run's bit for
bit, and only the step in flight is done twice."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
from parallel_harness import build, spawn, step_inputs, train  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

STEPS, FAIL_AFTER = 6, 4  # the groups are re-formed after the 4th step, whose snapshot is not taken yet


def train_regrouping(rank, world, port, out_dir, dims_kw: dict, options: dict) -> dict:
    import torch
    import torch.distributed as dist

    from trainer.parallel import ParallelDims, init_distributed
    from trainer.recovery import regroup
    from trainer.recovery.engine import engine_meta, engine_state, restore_engine
    from trainer.recovery.snapshot import Layout, RankSnapshots

    dims = ParallelDims(**dims_kw)
    engine, batches, micro_rows = build(dims, options)
    store = dist.FileStore(
        str(out_dir / "recovery-store"), -1
    )  # outlives the groups, as the job's store does
    snapshots: RankSnapshots | None = None
    losses: list[tuple[int, float]] = []
    pids, regrouped, index = set(), False, 0
    while index < len(batches):
        result = engine.train_step(step_inputs(engine, batches[index], micro_rows))
        losses.append((index, result.loss))
        index += 1
        state = engine_state(engine)
        snapshots = snapshots or RankSnapshots(Layout.of(state))
        vote = torch.tensor([snapshots.contribution()], dtype=torch.int64)
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)  # the sync point's vote
        snapshots.agree(int(vote))
        if index == FAIL_AFTER and not regrouped:  # as if a peer had died: leave, regroup, go back
            regrouped = True
            pids.add(os.getpid())
            regroup.leave()
            if rank == 0:  # the coordinator's part
                regroup.open_round(store, 1, world_size=world, assignments={})
            size = regroup.wait_for_round(store, 1, timeout_s=60)
            regroup.join(store, 1, rank=rank, world_size=size, backend="gloo", timeout_s=60)
            engine.rebind(init_distributed(dims))
            meta = restore_engine(engine, snapshots, step=snapshots.committed)
            index = meta["index"]
            continue
        snapshots.maybe_capture(index, state, {"index": index, **engine_meta(engine)})
    pids.add(os.getpid())
    return {"losses": losses, "pids": sorted(pids), "committed_at_regroup": FAIL_AFTER - 1}


@pytest.mark.parametrize("dims_kw", [{"dp": 2}, {"pp": 2}], ids=["dp2", "pp2"])
def test_an_engine_rebound_to_new_groups_and_restored_from_memory_trains_on_bitwise(tmp_path: Path, dims_kw):
    options = {"steps": STEPS, "rows": 4, "micro": 1}
    reference = spawn(train, 2, tmp_path / "reference", dims_kw, options)
    regrouped = spawn(train_regrouping, 2, tmp_path / "regrouped", dims_kw, options)
    expected = reference[-1]["losses"]  # the last stage reports the loss (every rank under dp)
    got = regrouped[-1]["losses"]
    assert [i for i, _ in got] == [0, 1, 2, 3, 3, 4, 5]  # step 4 (index 3) in flight: done twice
    assert [loss for _, loss in got] == [expected[i] for i, _ in got]  # bit for bit
    for result in regrouped:
        assert len(result["pids"]) == 1  # the same process before and after
