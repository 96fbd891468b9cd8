"""Replicas of the in-memory snapshots on peer ranks: each rank sends every snapshot it takes to its *buddy* and
keeps the snapshots of the rank whose buddy it is, in the background while training goes on.

Decisions:

- Ring placement across nodes: rank r's buddy is r + ranks_per_node (mod world), a rank on the next node, so a
  node's loss never takes a snapshot and its only replica together. With one node the buddy is the next rank,
  which covers a lost process but not a lost machine (`placement_covers_node_loss`).
- The transfer runs on a process group of its own, from a thread of its own: the training's collectives and the
  snapshot traffic never interleave on one group (a group's operations must be issued in the same order on every
  rank, which two threads could not promise), and a step does not wait for a transfer.
- Every rank captures at the same steps (`snapshot.should_capture` is decided from numbers all ranks agreed), so
  the ring exchange is symmetric: per snapshot, each rank sends one and receives one, a header first (step, sizes,
  checksum, layout fingerprint), then the buffer and the meta.
- A received replica counts once every byte of it has arrived (`Slot.complete`); the step is committed only when
  every own copy and every replica is complete (see snapshot.py), so a transfer cut by a failure is never used.
  Its checksum (the sender's, over the sender's bytes) is checked where the replica is used: by `restore` and by
  the newcomer `receive_slot` hands it to. Checked on arrival too, it would cost a second pass over every
  snapshot every step (118 MB a rank for the mini model) for a check that the use repeats anyway; a corrupt replica fails its restore, which the recovery reports like any
  failed restore.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .snapshot import RankSnapshots, Slot, SnapshotError, checksum

_STOP = object()


@dataclass(frozen=True, slots=True)
class Ring:
    rank: int
    world: int
    ranks_per_node: int

    @property
    def buddy(self) -> int:
        """Where this rank's snapshots go."""
        return (self.rank + self._hop) % self.world

    @property
    def source(self) -> int:
        """Whose snapshots this rank keeps."""
        return (self.rank - self._hop) % self.world

    @property
    def placement_covers_node_loss(self) -> bool:
        return self.world > self.ranks_per_node

    @property
    def _hop(self) -> int:
        return self.ranks_per_node if self.world > self.ranks_per_node else 1


class Replicator:
    """Sends this rank's snapshots to its buddy and receives its source's, on `group`, in a background thread.
    `submit(slot)` after each capture; `drain()` waits until everything submitted has been exchanged."""

    def __init__(self, snapshots: RankSnapshots, ring: Ring, group: dist.ProcessGroup | None):
        if ring.world < 2:
            raise ValueError("a snapshot replica needs a peer: the world has one rank")
        self.snapshots, self.ring, self.group = snapshots, ring, group
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._prepared = threading.Event()
        self._prepared.set()
        self.error: BaseException | None = None  # the exchange failed (a peer died): no replica until regroup
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="snapshot-replicator", daemon=True)
        self._thread.start()

    def submit(self, slot: Slot, prepare: Callable[[], None] | None = None) -> None:
        """Exchange `slot` with the peers; `prepare` (the snapshot's copy, see `snapshot.fill`) runs first, in the
        thread, and `prepared()` says when it is over."""
        self._idle.clear()
        self._prepared.clear()
        self._queue.put((slot, prepare))

    def prepared(self, timeout: float | None = None) -> bool:
        """True when the last submitted snapshot's `prepare` is over (its copy no longer reads the live state)."""
        return self._prepared.wait(timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """True when every submitted snapshot has been exchanged (or the exchange failed: see `error`)."""
        return self._idle.wait(timeout)

    def stop(self) -> None:
        """End the thread after what it is doing (without waiting: a transfer cut by a failure ends when the
        peers' connections close or the group's timeout passes)."""
        self._stopped = True
        self._queue.put(_STOP)

    def close(self) -> None:
        self.stop()
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            slot, prepare = item
            try:
                try:
                    if prepare is not None:
                        prepare()
                finally:
                    self._prepared.set()
                if self.error is None and not self._stopped:
                    self._exchange(slot)
            except BaseException as err:  # noqa: BLE001 - reported through `error`, read by the training thread
                self.error = err
            finally:
                if self._queue.empty():
                    self._idle.set()

    def _exchange(self, mine: Slot) -> None:
        to, frm = self._global(self.ring.buddy), self._global(self.ring.source)
        header = _header(mine)
        theirs_header = torch.empty(5, dtype=torch.int64)
        self._both(header, to, theirs_header, frm)
        step, nbytes, meta_len, expected, fingerprint = (int(v) for v in theirs_header)
        replica = self.snapshots.replica_slot(nbytes)
        meta_in = torch.empty(meta_len, dtype=torch.uint8)
        meta_out = _meta_tensor(mine)
        self._both(mine.data, to, replica.data, frm)
        if meta_out.numel() or meta_in.numel():
            self._both(meta_out, to, meta_in, frm)
        replica.meta = bytes(meta_in.numpy())
        if self._stopped:
            # A transfer that outlived its round (its peers regrouped without it) must not mark a buffer the next
            # round's replicator may be filling.
            return
        replica.checksum, replica.fingerprint, replica.step = expected, fingerprint, step
        replica.complete = True  # last: the training thread reads `complete` without a lock

    def _both(self, out: torch.Tensor, to: int, into: torch.Tensor, frm: int) -> None:
        """Send `out` to `to` and receive `into` from `frm` at once (a ring: everyone sends and receives)."""
        ops = []
        if out.numel():
            ops.append(dist.isend(out, to, group=self.group))
        if into.numel():
            ops.append(dist.irecv(into, frm, group=self.group))
        for op in ops:
            op.wait()

    def _global(self, ring_rank: int) -> int:
        return ring_rank if self.group is None else dist.get_global_rank(self.group, ring_rank)


def _header(slot: Slot) -> torch.Tensor:
    return torch.tensor(
        [slot.step, slot.data.numel(), len(slot.meta), slot.checksum, slot.fingerprint], dtype=torch.int64
    )


def _meta_tensor(slot: Slot) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(slot.meta), dtype=torch.uint8)
        if slot.meta
        else torch.empty(0, dtype=torch.uint8)
    )


def send_slot(slot: Slot, to: int) -> None:
    """Hand a kept replica to the rank that replaces its owner (after a regroup, on the default group; `to` is a
    global rank). The receiver calls `receive_slot`."""
    dist.send(_header(slot), to)
    dist.send(slot.data, to)
    if slot.meta:
        dist.send(_meta_tensor(slot), to)


def receive_slot(into: Slot, frm: int, *, fingerprint: int) -> None:
    """Receive the snapshot `send_slot` sends into `into` (a slot of this rank's own buffers): complete only when
    its checksum matches and it was taken with this rank's layout; raises SnapshotError otherwise."""
    into.clear()
    header = torch.empty(5, dtype=torch.int64)
    dist.recv(header, frm)
    step, nbytes, meta_len, expected, theirs = (int(v) for v in header)
    if nbytes != into.data.numel() or theirs != fingerprint:
        raise SnapshotError(
            f"the replica from rank {frm} has {nbytes} bytes and layout {theirs:#x}; this rank's snapshots have "
            f"{into.data.numel()} bytes and layout {fingerprint:#x}"
        )
    dist.recv(into.data, frm)
    meta = torch.empty(meta_len, dtype=torch.uint8)
    if meta_len:
        dist.recv(meta, frm)
    into.meta = bytes(meta.numpy())
    if checksum(into.data, into.meta) != expected:
        raise SnapshotError(f"the replica of step {step} from rank {frm} does not match its checksum")
    into.checksum, into.fingerprint, into.step = expected, theirs, step
    into.complete = True
