"""A rank's part in in-place recovery, as the training runtime (trainer/runtime.py) uses it.

`Membership` is this process's place in the job's rounds (regroup.py's protocol on the coordinator's store): a rank
started with its RANK joins round 0; a spare registers, waits for an assignment, and joins the round it was given.
After a failure every survivor leaves, waits for the next round and joins it with the newcomers.

`InPlace` holds the rank's snapshots and their replication, and runs the recovery after a regroup:

1. `restore_point`: every rank says which steps it holds (its own complete snapshots; a newcomer none) and which
   replica steps it keeps verified; the step to go back to is the newest one that every survivor holds and that
   the keeper of each lost rank's replica holds for it. None: some state is in no memory (a rank and its keeper
   both lost): the run falls back to the disk checkpoint (EXIT_RECOVERY_FALLBACK).
2. Each keeper sends the lost rank's replica to its newcomer (checksum and layout verified on arrival).
3. Every rank copies that snapshot into its live engine (`recovery.engine.restore_engine`) and the runtime puts
   the loader position, the RNGs, the step and token counts back from its meta.

Decisions:

- A failure is a collective that raised (`is_peer_failure`): gloo raises within milliseconds when a peer's
  process dies. A rank blocked on a live peer that is itself leaving learns of it when that peer destroys its
  groups (its connections close), so one rank's discovery reaches every rank.
- The restore point is computed after the regroup from what each rank holds, not taken from the last vote: a
  snapshot replicated after the last vote still counts, and a rank that missed the vote (the failure cut it)
  cannot make the ranks disagree.
- The replicator's thread is left to end on its own (its transfer fails when the peer's connections close) and a
  new one is started over the new groups; its group is made with a timeout so that it always ends.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from trainer.contract.telemetry import ENV_LOG_DIR, ENV_RECOVERY_MEMBER, ENV_RECOVERY_STORE

from . import regroup
from .coordinator import COMMITTED, CURRENT, SPARES, replaced_key, report_key, spare_key
from .engine import engine_meta, engine_state, restore_engine
from .replicate import Replicator, Ring, receive_slot, send_slot
from .snapshot import NONE, Layout, RankSnapshots
from .snapshot import fill as snapshot_fill

if TYPE_CHECKING:
    from trainer.faults import FaultInjector
    from trainer.parallel.engine import ParallelEngine

log = logging.getLogger("trainer.recovery")

SPARE_POLL_S = 24 * 3600.0  # a spare's wait for its assignment, in slices (it may wait for days)
SETTLE_SLICE_S = 0.05  # how often a rank waiting for a replica asks whether the next round has opened
_PEER_FAILURE_WORDS = (
    "connection",
    "gloo",
    "nccl",
    "peer",
    "timed out",
    "timeout",
    "broken pipe",
    "not init",
)


@dataclass(frozen=True, slots=True)
class RecoverySettings:
    store_host: str
    store_port: int
    member: str | None  # a spare's member id; None for a rank started with its RANK
    ranks_per_node: int
    snapshot_interval: int = 1
    regroup_timeout_s: float = 300.0  # how long a survivor waits for the next round
    collective_timeout_s: float = 600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str], **kw: Any) -> RecoverySettings | None:
        """None when the launcher did not ask for in-place recovery (no recovery store)."""
        address = env.get(ENV_RECOVERY_STORE)
        if not address:
            return None
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{ENV_RECOVERY_STORE}: expected host:port, got {address!r}")
        return cls(
            store_host=host,
            store_port=int(port),
            member=env.get(ENV_RECOVERY_MEMBER) or None,
            ranks_per_node=int(env.get("LOCAL_WORLD_SIZE", "1")),
            **kw,
        )


class PeerLost(RuntimeError):
    """The coordinator opened the next round while this rank was waiting on a peer outside any collective."""


def is_peer_failure(err: BaseException) -> bool:
    """A collective failed because a peer is gone or its groups were destroyed (not a bug in this rank)."""
    if isinstance(err, (dist.DistError, PeerLost, regroup.RoundSuperseded)):
        return True
    return isinstance(err, (RuntimeError, ValueError)) and any(
        w in str(err).lower() for w in _PEER_FAILURE_WORDS
    )


class Membership:
    """This process's place in the job's rounds (see the module docstring)."""

    def __init__(self, settings: RecoverySettings, *, world_size: int):
        self.settings, self.world_size = settings, world_size
        self.store = dist.TCPStore(
            settings.store_host,
            settings.store_port,
            is_master=False,
            timeout=timedelta(seconds=settings.regroup_timeout_s),
        )
        self.round = 0
        self.rank = -1
        self.newcomer = settings.member is not None
        self.replaced: list[int] = []
        # The coordinator's store unreachable: no round can form, so failures take the restart path.
        self.coordinator_lost = False

    def join_first(self, backend: str) -> int:
        """Join the job: round 0 for a rank started with its RANK; a spare waits for an assignment. Its rank."""
        member = self.settings.member
        if member is None:
            self.round, self.rank = 0, int(os.environ["RANK"])
        else:
            index = int(self.store.add(SPARES, 1)) - 1
            self.store.set(spare_key(index), json.dumps({"member": member, "pid": os.getpid()}))
            log.info("spare %s waiting for an assignment", member)
            while True:
                try:
                    self.round, self.rank = regroup.wait_for_assignment(
                        self.store, member, timeout_s=SPARE_POLL_S
                    )
                    break
                except dist.DistStoreError:
                    continue
            os.environ["RANK"] = str(self.rank)  # the telemetry and the logs name the rank
            log.info("spare %s is rank %d from round %d", member, self.rank, self.round)
            _continue_log_as_rank(self.rank)
        self._join(backend)
        return self.rank

    def rejoin(self, backend: str) -> None:
        """After `regroup.leave()`: wait for the next round, join the newest one open."""
        regroup.wait_for_round(self.store, self.round + 1, timeout_s=self.settings.regroup_timeout_s)
        # The newest round open (a second failure may have opened another since), never an older one.
        self.round = max(self.round + 1, int(self.store.get(CURRENT)))
        self._join(backend)

    def _join(self, backend: str) -> None:
        started = time.monotonic()
        world = regroup.wait_for_round(self.store, self.round, timeout_s=self.settings.regroup_timeout_s)
        if world != self.world_size:
            raise RuntimeError(f"round {self.round} has {world} ranks; this job has {self.world_size}")
        self.replaced = json.loads(self.store.get(replaced_key(self.round)))
        regroup.join(
            self.store,
            self.round,
            rank=self.rank,
            world_size=world,
            backend=backend,
            timeout_s=self.settings.collective_timeout_s,
        )
        self.report("joined")
        log.info("rank %d joined round %d in %.3f s", self.rank, self.round, time.monotonic() - started)

    def next_round_open(self) -> bool:
        """Whether the coordinator has opened a round after this one (a peer was lost). One store round trip;
        False once the coordinator is lost."""
        if self.coordinator_lost:
            return False
        try:
            return self.store.check([regroup.round_prefix(self.round + 1) + regroup.OPEN])
        except (RuntimeError, OSError) as err:
            self.lose_coordinator(err)
            return False

    def publish_committed(self, step: int) -> None:
        """The committed snapshot step, for `vlctl status` (through the coordinator); best effort."""
        if self.coordinator_lost:
            return
        try:
            self.store.set(COMMITTED, str(step))
        except (RuntimeError, OSError) as err:
            self.lose_coordinator(err)

    def lose_coordinator(self, err: BaseException) -> None:
        """The coordinator's store stopped answering during training (its process or pod died). Training goes
        on: the store is only needed to re-form the groups after a loss, and the next loss, with no round to
        join, ends this process (`Runtime._regroup`), so the controller restarts the job from its disk
        checkpoint, as it does without in-place recovery."""
        if not self.coordinator_lost:
            log.warning(
                "rank %d: the recovery coordinator is unreachable (%s); training goes on without in-place "
                "recovery: a lost rank now restarts the job from its newest disk checkpoint",
                self.rank,
                str(err).splitlines()[0][:200] if str(err) else type(err).__name__,
            )
        self.coordinator_lost = True

    def report(self, what: str, **fields: Any) -> None:
        self.store.set(report_key(self.round, what, self.rank), json.dumps({"time": time.time(), **fields}))


class InPlace:
    """Snapshots, their replicas and the restore after a regroup, for one rank (see the module docstring)."""

    def __init__(self, membership: Membership, engine: ParallelEngine, faults: FaultInjector | None = None):
        self.membership, self.faults = membership, faults
        settings = membership.settings
        self.snapshots = RankSnapshots(Layout.of(engine_state(engine)), interval=settings.snapshot_interval)
        self.ring = Ring(dist.get_rank(), dist.get_world_size(), settings.ranks_per_node)
        self.replicator: Replicator | None = None
        self.newcomers: list[int] = []
        if not membership.newcomer:  # a newcomer's replicator starts after its restore, as the survivors' do
            self._start_replicator()

    def _start_replicator(self) -> None:
        if self.ring.world < 2:
            return
        group = dist.new_group(
            backend="gloo", timeout=timedelta(seconds=self.membership.settings.collective_timeout_s)
        )
        self.replicator = Replicator(self.snapshots, self.ring, group)

    # ------------------------------------------------------------------------------------- every step

    def settle_replicas(self) -> None:
        """Wait until the snapshot taken after the previous step has reached its keeper (and the peer's has
        arrived here), before the sync point votes. Without this wait a replica still in flight leaves that step
        uncommitted, `should_capture` skips the next one, and a failure goes back two steps instead of one; with
        it every step's snapshot is committed at the next sync point, so a failure costs at most the step in
        flight and the one before it. The exchange overlaps the step's compute; only what is left of it is
        waited for. A transfer cut by a lost peer ends the wait too (the replicator records its error)."""
        if self.replicator is None:
            return
        # In slices, asking the coordinator between them whether a next round has opened: a transfer to a dead
        # peer normally fails at once, but one was seen blocked for minutes (the rank then sat here with no
        # collective to fail and every other rank waited for it in the next round). The controller opens that
        # round once it has seen a node end, so a wait here never outlives the failure it is waiting on.
        while not self.replicator.drain(SETTLE_SLICE_S):
            if self.membership.next_round_open():
                raise PeerLost(
                    f"round {self.membership.round + 1} opened while a snapshot replica was in flight: a peer is "
                    "gone"
                )

    def vote(self) -> int:
        """This rank's contribution to the committed step (all-reduced with MIN at the sync point)."""
        return self.snapshots.contribution()

    def agreed(self, committed: int) -> None:
        """The sync point's result: the committed step."""
        if committed != self.snapshots.committed and self.membership.rank == 0 and committed != NONE:
            self.membership.publish_committed(committed)
        self.snapshots.agree(committed)

    def after_step(self, step: int, engine: ParallelEngine, meta: Mapping[str, Any]) -> None:
        """Snapshot the step when due and send it to its keeper (every rank takes the same steps). The small
        state is taken here; the tensors are copied by the replicator's thread while the next step computes,
        then sent, and both are over by the next sync point (`settle_replicas`)."""
        slot = self.snapshots.maybe_begin(step, {**meta, **engine_meta(engine)})
        if slot is None:
            return
        state = engine_state(engine)
        midway = None if self.faults is None else functools.partial(self.faults.in_snapshot, step)
        copy = functools.partial(snapshot_fill, slot, self.snapshots.layout, state, step=step, midway=midway)
        if self.replicator is None:
            copy()
        else:
            self.replicator.submit(slot, copy)

    # ------------------------------------------------------------------------------------- recovery

    def regroup(self, backend: str) -> None:
        """After a failed collective: leave every group and join the next round (same process)."""
        if self.replicator is not None:
            # A snapshot copy in flight reads the live state, which the restore is about to write: it ends
            # first (a copy waits on no peer). Its thread ends after the transfer in flight, which fails or
            # finishes; nothing it receives after this counts (`Replicator.stop`).
            self.replicator.prepared()
            self.replicator.stop()
        self.replicator = None
        regroup.leave()
        self.membership.rejoin(backend)

    def restore_point(self) -> int | None:
        """Collective over the new world: the newest step every rank can go back to, or None (see the module
        docstring)."""
        # A newcomer holds nothing of its own: its rank's state comes from its keeper. That is the ranks this
        # round replaced, and also a newcomer of an earlier round that was lost again before it had restored.
        mine = {
            "own": None if self.membership.newcomer else _steps(self.snapshots.own.slots),
            "replica": _steps(self.snapshots.replica.slots) if self.snapshots.replica else [],
        }
        everyone: list[Any] = [None] * self.ring.world
        dist.all_gather_object(everyone, mine)
        self.newcomers = [rank for rank in range(self.ring.world) if everyone[rank]["own"] is None]
        newcomers = set(self.newcomers)
        candidates: set[int] | None = None
        for rank in range(self.ring.world):
            if rank in newcomers:
                keeper = Ring(rank, self.ring.world, self.ring.ranks_per_node).buddy
                held = set() if keeper in newcomers else set(everyone[keeper]["replica"])
            else:
                held = set(everyone[rank]["own"])
            candidates = held if candidates is None else candidates & held
        return max(candidates) if candidates else None

    def restore(self, engine: ParallelEngine, step: int, *, done: int | None) -> Mapping[str, Any]:
        """Hand the lost ranks' replicas to their newcomers, then go back to `step` on every rank (collective);
        the snapshot's meta. `done`: the steps this rank had completed when the failure came (None: a newcomer),
        reported with the step resumed from, so the controller can count the steps done again."""
        replaced = self.newcomers  # as restore_point found them
        me = self.ring.rank
        started = time.monotonic()
        for rank in replaced:
            keeper = Ring(rank, self.ring.world, self.ring.ranks_per_node).buddy
            if me == keeper:
                slot = self.snapshots.replica.holding(step) if self.snapshots.replica else None
                assert slot is not None, "restore_point promised this replica"
                send_slot(slot, rank)
            elif me == rank:
                receive_slot(
                    self.snapshots.own.free(NONE), keeper, fingerprint=self.snapshots.layout.fingerprint
                )
        sent = time.monotonic()
        if self.faults is not None:
            self.faults.in_restore(step)
        meta = restore_engine(engine, self.snapshots, step=step)
        log.info(
            "restore of step %d: replicas handed over in %.3f s, engine restored in %.3f s (%.0f MB a snapshot)",
            step, sent - started, time.monotonic() - sent, self.snapshots.layout.nbytes / 1e6,
        )  # fmt: skip
        self.snapshots.agree(step)
        self.snapshots.last_captured = step
        self.membership.newcomer = False
        self._start_replicator()
        # The restored step goes out to the keepers again: a newcomer's keeper has nothing of it yet.
        slot = self.snapshots.own.holding(step)
        if slot is not None and self.replicator is not None:
            self.replicator.submit(slot)
        self.membership.report("resumed", step=step, done=done)
        return meta


def _continue_log_as_rank(rank: int) -> None:
    """A spare given a rank writes on in that rank's log (`rank-<N>.log`, appended: after the lost process's
    lines), so `vlctl logs --rank N` shows the rank's whole story; its spare log says where it went."""
    folder = os.environ.get(ENV_LOG_DIR)
    if not folder:
        return
    path = os.path.join(folder, f"rank-{rank}.log")
    log.info("this spare's log continues in %s", path)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _steps(slots: Any) -> list[int]:
    return sorted(s.step for s in slots if s.complete)
