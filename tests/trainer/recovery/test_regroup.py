"""Survivors re-form their group in the same process: a rank SIGKILLed from outside is replaced by a spare that
was waiting for an assignment, and the survivor goes on with the same pid, on real gloo groups."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
import traceback
from datetime import timedelta
from multiprocessing import connection

import pytest

pytestmark = pytest.mark.multiproc

STEPS = 60
KILL_AT = 20


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _member(role: str, rank: int, port: int, out) -> None:
    """A rank (or a spare) summing its step number with the others' each step, through every failure."""
    try:
        import torch
        import torch.distributed as dist

        from trainer.recovery import regroup

        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
        round_, step, sums = 0, 0, []
        if role == "spare":
            out.send(("ready", role, os.getpid()))
            round_, rank = regroup.wait_for_assignment(store, f"spare-{os.getpid()}", timeout_s=60)
        world = regroup.wait_for_round(store, round_, timeout_s=60)
        regroup.join(store, round_, rank=rank, world_size=world, backend="gloo", timeout_s=20)
        out.send(("joined", role, os.getpid(), rank, round_, time.time()))
        if role == "spare":  # take the group's step from rank 0 (in the runtime: the agreed snapshot step)
            agreed = torch.zeros(1, dtype=torch.int64)
            dist.broadcast(agreed, 0)
            step = int(agreed)
        while step < STEPS:
            x = torch.tensor([float(step)])
            try:
                dist.all_reduce(x)
            except RuntimeError as err:  # a peer is gone: leave, wait for the next round, join it
                failed_at = time.time()
                regroup.leave()
                round_ += 1
                world = regroup.wait_for_round(store, round_, timeout_s=60)
                regroup.join(store, round_, rank=rank, world_size=world, backend="gloo", timeout_s=20)
                out.send(
                    ("regrouped", role, os.getpid(), rank, round_, failed_at, time.time(), str(err)[:80])
                )
                dist.broadcast(torch.tensor([step], dtype=torch.int64), 0)
                continue  # the step is done again in the new group
            sums.append(float(x))
            if step == KILL_AT - 1 and rank == 1 and role == "rank":
                out.send(("at-kill-step", role, os.getpid()))
                time.sleep(60)  # waits here until the test kills it
            step += 1
        out.send(("done", role, os.getpid(), rank, sums))
        regroup.leave()
    except BaseException:  # noqa: BLE001 - reported to the test
        out.send(("error", role, os.getpid(), traceback.format_exc()))


class _Inbox:
    """Messages from the members, one pipe each: a multiprocessing.Queue is shared, and a member SIGKILLed while
    its feeder thread held the queue's lock blocks every other member's messages for good (seen here)."""

    def __init__(self, readers):
        self.readers, self.pending = list(readers), []

    def get(self, timeout: float):
        deadline = time.monotonic() + timeout
        while not self.pending:
            ready = connection.wait(self.readers, timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                raise TimeoutError(f"no message from the members in {timeout} s")
            for reader in ready:
                try:
                    self.pending.append(reader.recv())
                except EOFError:  # that member is gone
                    self.readers.remove(reader)
        return self.pending.pop(0)


def test_a_killed_rank_is_replaced_by_a_spare_and_the_survivor_keeps_its_process():
    import torch.distributed as dist

    from trainer.recovery import regroup

    port = _port()
    store = dist.TCPStore(
        "127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    ctx = multiprocessing.get_context("spawn")
    procs, readers = [], []
    for role, rank in (("rank", 0), ("rank", 1), ("spare", -1)):
        reader, writer = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=_member, args=(role, rank, port, writer)))
        readers.append(reader)
    for p in procs:
        p.start()
    out = _Inbox(readers)
    regroup.open_round(store, 0, world_size=2, assignments={})
    seen: list[tuple] = []
    try:
        spare_pid = victim = None
        while spare_pid is None or victim is None:
            msg = out.get(timeout=120)
            seen.append(msg)
            assert msg[0] != "error", msg[3]
            if msg[0] == "ready":
                spare_pid = msg[2]
            if msg[0] == "at-kill-step":
                victim = msg[2]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        regroup.open_round(store, 1, world_size=2, assignments={f"spare-{spare_pid}": 1})
        done = {}
        while len(done) < 2:
            msg = out.get(timeout=120)
            seen.append(msg)
            assert msg[0] != "error", msg[3]
            if msg[0] == "done":
                done[msg[1]] = msg
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    survivor = next(m for m in seen if m[0] == "joined" and m[1] == "rank" and m[3] == 0)
    regrouped = next(m for m in seen if m[0] == "regrouped")
    assert regrouped[2] == survivor[2] == done["rank"][2]  # the survivor never left its process
    assert regrouped[4] == 1, regrouped  # one round later
    # Every step's sum is the two members' step numbers: the replacement took the step over where the dead
    # rank left it, and the survivor redid nothing but the step in flight.
    assert done["rank"][4] == [2.0 * s for s in range(STEPS)]
    assert done["spare"][4] == [2.0 * s for s in range(KILL_AT, STEPS)]
    print(
        f"\n[regroup] survivor saw the failure {regrouped[5] - killed_at:.3f} s after the kill, "
        f"in the new group {regrouped[6] - killed_at:.3f} s after it"
    )


COORDINATOR = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
print(store.port, flush=True)
time.sleep(600)
"""


def test_a_lost_coordinator_leaves_training_going_without_in_place_recovery(caplog) -> None:
    """The coordinator's process dies while the ranks train: the calls a training step makes on its store (has
    a next round opened? publish the committed step) answer as "nothing new" and say once why, so the job
    trains on; the next failure then takes the restart path (Runtime._regroup ends the rank)."""
    import subprocess
    import sys

    from trainer.recovery.inplace import Membership, RecoverySettings

    coordinator = subprocess.Popen([sys.executable, "-c", COORDINATOR], stdout=subprocess.PIPE, text=True)
    try:
        port = int(coordinator.stdout.readline())
        settings = RecoverySettings("127.0.0.1", port, member=None, ranks_per_node=1, regroup_timeout_s=5)
        membership = Membership(settings, world_size=2)
        membership.rank = 0
        assert membership.next_round_open() is False and not membership.coordinator_lost
        membership.publish_committed(3)
        assert membership.store.get("committed") == b"3"
        coordinator.kill()
        coordinator.wait()
        with caplog.at_level("WARNING"):
            for step in (4, 5):  # two steps' worth: one warning
                membership.publish_committed(step)
                assert membership.next_round_open() is False
        assert membership.coordinator_lost
        warned = [r.getMessage() for r in caplog.records if "coordinator is unreachable" in r.getMessage()]
        assert len(warned) == 1 and "restarts the job from its newest disk checkpoint" in warned[0], warned
    finally:
        coordinator.kill()
        coordinator.wait()
