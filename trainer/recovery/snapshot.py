"""In-memory snapshots: a rank's whole training state, copied into host memory every few steps, with a replica
on a peer rank, so that a lost rank is restored from memory instead of from the disk checkpoint.

A snapshot holds what a resume needs: the state tensors the checkpoint writes (this rank's model shard and ZeRO-1
optimizer fragments, as `Run._checkpoint_tensors` gives them) and the small rest (step, tokens seen, the
scheduler, the data loader's position, every RNG) as `meta`.

Decisions:

- One flat byte buffer per snapshot. Every tensor is copied into its own aligned range of it (one memmove for a
  contiguous CPU tensor, as the checkpoint stager does), so replicating a snapshot to a peer is one send of one
  buffer, whatever the number of tensors (a model has thousands of optimizer fragments), and its checksum is one
  pass over contiguous memory. The checksum is XXH3-64 (about 28 GB/s on one core here, against 4.2 GB/s for
  zlib's CRC-32, which took a third of a snapshot's CPU time when it ran every step; `bench_snapshot`): it guards
  against a torn or damaged buffer, not against an adversary, and 64 bits make a random collision rarer than
  CRC-32's 32 do. The layout (names, dtypes, shapes, offsets) is
  derived from the state itself, so a replacement rank that builds the same state computes the same layout; a
  fingerprint of it travels with the snapshot and is checked before a restore.
- Double-buffered, for the own copy and for the replica alike: a snapshot is written into the buffer that does
  not hold the step the ranks may have to go back to, so a snapshot half-written when a rank dies is never a
  restore point (it is not `complete`, and its checksum would not match anyway).
- Which step the ranks go back to is agreed, not guessed: at each step's sync point every rank contributes the
  newest step for which both its own snapshot is complete and the replica it keeps for its peer has arrived, and
  the minimum over all ranks is the *committed* step, the same on every rank. A buffer holding the committed step
  is never overwritten. A new snapshot is taken only when the previous one is committed everywhere
  (`should_capture`), a decision every rank makes from the same agreed numbers, so the ranks skip the same steps
  and never disagree about which snapshot a replica belongs to. With replication slower than a step, snapshots
  fall to every other step: more steps recomputed after a failure, never a wrong state.
- `meta` is serialised with torch.save and read back with torch.load(weights_only=True): plain data and tensors
  only, never pickled objects.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from trainer.checkpoint.chunk import LocalChunk
from trainer.checkpoint.staging import copy_into

State = Mapping[str, Mapping[str, torch.Tensor]]  # {group: {name: tensor}}, as the checkpoint takes it
ALIGN = 64  # bytes: every tensor's range starts on a cache line, so typed views of the buffer are aligned
NONE = -1  # "no step": no snapshot complete, or none committed yet


@dataclass(frozen=True, slots=True)
class Entry:
    group: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # of the rank's local piece
    offset: int  # bytes into the buffer
    nbytes: int


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each tensor of a state lives in a snapshot buffer."""

    entries: tuple[Entry, ...]
    nbytes: int
    fingerprint: int  # CRC-32 of the description: equal layouts, equal fingerprints

    @classmethod
    def of(cls, state: State) -> Layout:
        entries, offset = [], 0
        for group in sorted(state):
            for name in sorted(state[group]):
                local = _local(state[group][name])
                nbytes = local.numel() * local.element_size()
                entries.append(Entry(group, name, local.dtype, tuple(local.shape), offset, nbytes))
                offset += -(-nbytes // ALIGN) * ALIGN
        description = ";".join(f"{e.group}/{e.name}:{e.dtype}:{e.shape}:{e.offset}" for e in entries)
        return cls(tuple(entries), offset, zlib.crc32(description.encode()))


class SnapshotError(RuntimeError):
    """A snapshot cannot be used: incomplete, corrupt, or of another state's layout."""


@dataclass(slots=True)
class Slot:
    """One snapshot buffer and what it holds."""

    data: torch.Tensor  # uint8, flat
    step: int = NONE
    complete: bool = False  # every byte written (own copy) or received (replica; its checksum checked on use)
    meta: bytes = b""
    checksum: int = 0
    fingerprint: int = 0

    def clear(self) -> None:
        self.step, self.complete, self.meta, self.checksum, self.fingerprint = NONE, False, b"", 0, 0


def capture(slot: Slot, layout: Layout, state: State, meta: Mapping[str, Any], *, step: int) -> None:
    """Copy `state` and `meta` into `slot` as the snapshot of `step`. The slot is not complete until this
    returns: a failure midway leaves it unusable, never half-valid."""
    begin(slot, meta)
    fill(slot, layout, state, step=step)


def begin(slot: Slot, meta: Mapping[str, Any]) -> None:
    """The first half of `capture`, at the step boundary: the slot emptied and the small state (`meta`: the data
    position, the RNGs) serialised, because the training thread changes it as soon as the next step starts."""
    slot.clear()
    buffer = io.BytesIO()
    torch.save(dict(meta), buffer)
    slot.meta = buffer.getvalue()


def fill(
    slot: Slot, layout: Layout, state: State, *, step: int, midway: Callable[[], None] | None = None
) -> None:
    """The second half: the tensors copied in and the snapshot sealed. It may run while the next step computes
    (the weights and the optimizer state change only in that step's optimizer, after its sync point), and must
    be over before that sync point. `midway` (fault injection) runs when half the tensors are copied."""
    half = len(layout.entries) // 2
    for index, entry in enumerate(layout.entries):
        if index == half and midway is not None:
            midway()
        local = _local(state[entry.group][entry.name])
        if tuple(local.shape) != entry.shape or local.dtype != entry.dtype:
            raise SnapshotError(
                f"{entry.group}/{entry.name}: the state no longer matches the snapshot layout"
            )
        copy_into(_view(slot.data, entry), local)  # one memmove for a contiguous CPU tensor
    slot.checksum = checksum(slot.data, slot.meta)
    slot.fingerprint = layout.fingerprint
    slot.step, slot.complete = step, True


def restore(slot: Slot, layout: Layout, state: State) -> dict[str, Any]:
    """Copy the snapshot in `slot` back into the live tensors of `state`; returns its meta. Checks that the slot
    is complete, of this layout, and that its bytes still match their checksum."""
    if not slot.complete:
        raise SnapshotError(f"snapshot of step {slot.step}: incomplete, never a restore point")
    if slot.fingerprint != layout.fingerprint:
        raise SnapshotError(f"snapshot of step {slot.step}: written for another state layout")
    if checksum(slot.data, slot.meta) != slot.checksum:
        raise SnapshotError(f"snapshot of step {slot.step}: checksum mismatch (corrupt)")
    with torch.no_grad():
        for entry in layout.entries:
            _local(state[entry.group][entry.name]).copy_(_view(slot.data, entry))
    return torch.load(io.BytesIO(slot.meta), weights_only=True)


def checksum(data: torch.Tensor, meta: bytes) -> int:
    """XXH3-64 of the buffer then the meta, as a signed 64-bit integer (it travels in an int64 header)."""
    digest = xxhash.xxh3_64(memoryview(data.numpy()))
    digest.update(meta)
    value = digest.intdigest()
    return value - (1 << 64) if value >= 1 << 63 else value


def should_capture(step: int, *, committed: int, last_captured: int, interval: int) -> bool:
    """Whether every rank snapshots after `step`: at the interval, and only when the previous snapshot is
    committed everywhere (so the buffer not holding it is free on every rank at once)."""
    return step % interval == 0 and (last_captured == NONE or committed >= last_captured)


class DoubleBuffer:
    """Two slots: one may hold the committed step (never overwritten), the other takes the next snapshot."""

    def __init__(self, nbytes: int):
        self.slots = (
            Slot(torch.empty(nbytes, dtype=torch.uint8)),
            Slot(torch.empty(nbytes, dtype=torch.uint8)),
        )

    def free(self, committed: int) -> Slot:
        """The slot to write next: never the one holding `committed`; of the other two cases, the older."""
        a, b = self.slots
        if a.complete and a.step == committed:
            return b
        if b.complete and b.step == committed:
            return a
        return a if a.step <= b.step else b

    def newest_complete(self) -> int:
        return max((s.step for s in self.slots if s.complete), default=NONE)

    def holding(self, step: int) -> Slot | None:
        return next((s for s in self.slots if s.complete and s.step == step), None)


class RankSnapshots:
    """This rank's own snapshots and the replicas it keeps for its peer (see the module's docstring)."""

    def __init__(self, layout: Layout, *, interval: int = 1):
        if interval < 1:
            raise ValueError(f"snapshot_interval_steps: must be >= 1, got {interval}")
        self.layout, self.interval = layout, interval
        self.own = DoubleBuffer(layout.nbytes)
        self.replica: DoubleBuffer | None = None  # sized when the peer's first snapshot arrives
        self.committed = NONE  # agreed by every rank at the last sync point
        self.last_captured = NONE

    @property
    def nbytes(self) -> int:
        """Host memory held: two own buffers, two for the peer's replica."""
        own = sum(s.data.nbytes for s in self.own.slots)
        return own + (sum(s.data.nbytes for s in self.replica.slots) if self.replica else own)

    def contribution(self) -> int:
        """This rank's vote for the committed step: the newest step whose own copy is complete and whose replica
        here is verified (a rank without a peer, or before any replica arrived, counts only its own)."""
        own = self.own.newest_complete()
        if self.replica is None:
            return own
        return min(own, self.replica.newest_complete())

    def agree(self, committed: int) -> None:
        """The minimum of every rank's contribution, as the sync point all-reduced it."""
        self.committed = committed

    def maybe_capture(self, step: int, state: State, meta: Mapping[str, Any]) -> Slot | None:
        """Snapshot `step` when due (`should_capture`); the slot written, or None when skipped."""
        slot = self.maybe_begin(step, meta)
        if slot is not None:
            fill(slot, self.layout, state, step=step)
        return slot

    def maybe_begin(self, step: int, meta: Mapping[str, Any]) -> Slot | None:
        """`maybe_capture`'s first half (see `begin`); the slot for `fill`, or None when the step is skipped."""
        if not should_capture(
            step, committed=self.committed, last_captured=self.last_captured, interval=self.interval
        ):
            return None
        slot = self.own.free(self.committed)
        begin(slot, meta)
        self.last_captured = step
        return slot

    def replica_slot(self, nbytes: int) -> Slot:
        """The replica slot a peer's next snapshot is received into."""
        if self.replica is None or self.replica.slots[0].data.nbytes != nbytes:
            self.replica = DoubleBuffer(nbytes)
        slot = self.replica.free(self.committed)
        slot.clear()
        return slot

    def restore(self, state: State, *, step: int) -> dict[str, Any]:
        """Go back to the own snapshot of `step` (the committed one)."""
        slot = self.own.holding(step)
        if slot is None:
            raise SnapshotError(f"no complete snapshot of step {step} on this rank")
        return restore(slot, self.layout, state)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.local if isinstance(tensor, LocalChunk) else tensor


def _view(data: torch.Tensor, entry: Entry) -> torch.Tensor:
    return data[entry.offset : entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)
