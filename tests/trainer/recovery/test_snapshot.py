"""In-memory snapshots: bitwise round trips, what is never a restore point, the agreed-step buffer rule, the ring
placement, and replicas exchanged by real processes over gloo."""

from __future__ import annotations

import functools
import multiprocessing
import os
import socket
import traceback

import pytest
import torch

from trainer.checkpoint.chunk import LocalChunk
from trainer.checkpoint.rng import capture_rng
from trainer.recovery.replicate import Replicator, Ring
from trainer.recovery.snapshot import (
    ALIGN,
    NONE,
    DoubleBuffer,
    Layout,
    RankSnapshots,
    Slot,
    SnapshotError,
    capture,
    fill,
    restore,
    should_capture,
)


def _state(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    fp32 = torch.randn(1000, generator=g)
    return {
        "model": {
            "w": torch.randn(7, 5, generator=g),
            "w_bf16": torch.randn(3, 33, generator=g).to(torch.bfloat16),
            "frozen_rows": torch.randn(6, 4, generator=g)[::2],  # not contiguous
            "empty": torch.empty(0, 3),
        },
        "optim": {
            "step": torch.tensor(seed, dtype=torch.int64),
            "w.fp32": LocalChunk(
                fp32[100:400], (1000,), (100,)
            ),  # a ZeRO-1 fragment: a view of a flat buffer
        },
    }


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.local if isinstance(t, LocalChunk) else t


def _bits(state) -> dict[str, bytes]:
    out = {}
    for group, tensors in state.items():
        for name, t in tensors.items():
            local = _local(t)
            out[f"{group}/{name}"] = (
                local.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if local.numel() else b""
            )
    return out


def test_a_snapshot_restores_every_tensor_and_the_meta_bit_for_bit():
    state, later = _state(1), _state(2)
    layout = Layout.of(state)
    assert all(e.offset % ALIGN == 0 for e in layout.entries)
    slot = Slot(torch.empty(layout.nbytes, dtype=torch.uint8))
    meta = {"step": 7, "tokens_seen": 1234, "loader": {"epoch": 1, "cursor": [3, 4]}, "rng": capture_rng()}
    capture(slot, layout, state, meta, step=7)
    expected = _bits(state)
    for group, tensors in later.items():  # training moves on: the live tensors change in place
        for name, t in tensors.items():
            _local(state[group][name]).copy_(_local(t))
    assert _bits(state) != expected
    back = restore(slot, layout, state)
    assert _bits(state) == expected
    assert back["loader"] == meta["loader"] and back["tokens_seen"] == 1234
    assert torch.equal(back["rng"]["torch"], meta["rng"]["torch"])


def test_an_incomplete_corrupt_or_foreign_snapshot_is_never_restored():
    state = _state(1)
    layout = Layout.of(state)
    slot = Slot(torch.empty(layout.nbytes, dtype=torch.uint8))
    with pytest.raises(SnapshotError, match="incomplete"):
        restore(slot, layout, state)
    capture(slot, layout, state, {"step": 1}, step=1)
    slot.data[layout.entries[0].offset] ^= 0xFF
    with pytest.raises(SnapshotError, match="checksum"):
        restore(slot, layout, state)
    slot.data[layout.entries[0].offset] ^= 0xFF
    other = dict(state, model={**state["model"], "w": torch.zeros(8, 5)})
    with pytest.raises(SnapshotError, match="another state layout"):
        restore(slot, Layout.of(other), other)
    with pytest.raises(SnapshotError, match="model/w"):
        capture(slot, layout, other, {}, step=2)
    assert not slot.complete  # a capture that failed midway leaves nothing to restore


def test_the_buffer_holding_the_committed_step_is_never_overwritten_and_ranks_skip_together():
    state = _state(1)
    snaps = RankSnapshots(Layout.of(state))
    assert snaps.maybe_capture(1, state, {}).step == 1
    # Step 1 is not committed everywhere yet: step 2 is skipped (on every rank: the numbers are agreed).
    assert snaps.contribution() == 1
    snaps.agree(NONE)
    assert snaps.maybe_capture(2, state, {}) is None
    snaps.agree(1)
    slot3 = snaps.maybe_capture(3, state, {})
    assert slot3.step == 3 and snaps.own.holding(1) is not None  # step 1 kept beside it
    snaps.agree(1)  # 3 not committed yet: 4 skipped, 1 still kept
    assert snaps.maybe_capture(4, state, {}) is None and snaps.own.holding(1) is not None
    snaps.agree(3)
    assert snaps.maybe_capture(5, state, {}).step == 5
    assert snaps.own.holding(3) is not None and snaps.own.holding(1) is None
    assert should_capture(6, committed=5, last_captured=5, interval=2) and not should_capture(
        5, committed=5, last_captured=4, interval=2
    )
    buffers = DoubleBuffer(8)
    buffers.slots[0].step, buffers.slots[0].complete = 9, True
    buffers.slots[1].step, buffers.slots[1].complete = 8, True
    assert buffers.free(committed=8) is buffers.slots[0]
    assert buffers.free(committed=9) is buffers.slots[1]


@pytest.mark.parametrize(
    ("world", "per_node", "buddies", "covers"),
    [
        (4, 2, [2, 3, 0, 1], True),
        (2, 1, [1, 0], True),
        (3, 3, [1, 2, 0], False),
        (6, 2, [2, 3, 4, 5, 0, 1], True),
    ],
)
def test_each_rank_sends_its_snapshots_to_a_rank_on_the_next_node(world, per_node, buddies, covers):
    rings = [Ring(rank=r, world=world, ranks_per_node=per_node) for r in range(world)]
    assert [r.buddy for r in rings] == buddies
    assert [rings[b].source for b in buddies] == list(range(world))
    assert all(r.placement_covers_node_loss == covers for r in rings)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(state) -> None:
    """A step of training: every model tensor moves (one add at a time: bf16 rounds each)."""
    for t in state["model"].values():
        if t.numel() and t.is_floating_point():
            t.add_(1.0)


def _replicating_rank(rank: int, world: int, port: int, out) -> None:
    try:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.new_group(list(range(world)))  # the replicas' own group
        state = _state(100 + rank)
        snaps = RankSnapshots(Layout.of(state))
        ring = Ring(rank=rank, world=world, ranks_per_node=1)
        replicator = Replicator(snaps, ring, group)
        agreed = []
        for step in range(1, 7):
            # (the step's compute: the previous snapshot is copied and sent meanwhile, in the thread)
            assert replicator.drain(timeout=60)  # the sync point waits for it (InPlace.settle_replicas)
            vote = torch.tensor([snaps.contribution()], dtype=torch.int64)
            dist.all_reduce(vote, op=dist.ReduceOp.MIN)
            snaps.agree(int(vote))
            agreed.append(int(vote))
            _train(state)  # the optimizer: the state changes only after the sync point
            if (slot := snaps.maybe_begin(step, {"step": step, "rank": rank})) is not None:
                replicator.submit(slot, functools.partial(fill, slot, snaps.layout, state, step=step))
        assert replicator.drain(timeout=60) and replicator.error is None
        replicator.close()
        newest = snaps.replica.newest_complete()
        source_state = _state(100 + ring.source)  # what the source rank's state was at `newest`
        for _ in range(newest):
            _train(source_state)
        expected = _bits(source_state)
        restored = _state(0)
        meta = restore(snaps.replica.holding(newest), Layout.of(restored), restored)
        out.put((rank, agreed, newest, meta["rank"], _bits(restored) == expected, None))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test
        out.put((rank, None, None, None, False, traceback.format_exc()))


@pytest.mark.multiproc
def test_three_ranks_keep_each_others_snapshots_and_agree_on_the_committed_step():
    world, port = 3, _port()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_replicating_rank, args=(r, world, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=180) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    for rank, agreed, newest, source, same, error in results:
        assert error is None, error
        assert same, f"rank {rank}: the replica differs from its source's state"
        assert source == (rank - 1) % world
        # Every rank saw the same agreed steps, and each sync point committed the step before it: a failure
        # goes back at most one completed step.
        assert agreed == [NONE, 1, 2, 3, 4, 5]
        assert newest == 6


class _StuckReplicator:
    """A replicator whose transfer never ends (a peer that stopped answering)."""

    def drain(self, timeout: float | None = None) -> bool:
        return False


def test_a_rank_waiting_for_a_replica_leaves_when_the_next_round_opens():
    """settle_replicas waits for the transfer in slices and gives up with PeerLost once the coordinator has
    opened the next round: a rank blocked outside any collective still learns of the failure."""
    import threading

    import torch.distributed as dist

    from trainer.recovery import regroup
    from trainer.recovery.inplace import InPlace, Membership, PeerLost, is_peer_failure

    membership = Membership.__new__(Membership)  # its store and round only: no coordinator to connect to
    membership.store, membership.round, membership.coordinator_lost = dist.HashStore(), 3, False
    inplace = InPlace.__new__(InPlace)
    inplace.membership, inplace.replicator = membership, _StuckReplicator()
    assert not membership.next_round_open()
    opener = threading.Timer(0.3, membership.store.set, (regroup.round_prefix(4) + regroup.OPEN, "2"))
    opener.start()
    with pytest.raises(PeerLost) as err:
        inplace.settle_replicas()
    opener.join()
    assert membership.next_round_open() and is_peer_failure(err.value)
