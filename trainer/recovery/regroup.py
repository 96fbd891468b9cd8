"""Re-forming the process groups inside the running processes after a rank is lost, with its replacement.

The protocol, on the job's recovery store (a TCPStore that outlives every rank; its host, the recovery
coordinator, is the only writer of the round keys):

1. Round k's groups rendezvous under the prefix `round-k/`, so nothing of an earlier round (the addresses of
   the dead rank's groups) is ever read again.
2. A survivor learns of the failure from its collective (gloo raises within milliseconds when a peer's
   process dies: its connection resets; a rank that hangs is the collective timeout's or the controller's to
   find). It destroys every group of its round (`leave`) and waits for round k + 1 to open.
3. The coordinator opens round k + 1 by writing each newcomer's assignment (`assign/<member>`: the rank it
   takes), then `round-<k+1>/open` with the world size. A spare waits on its own assignment key, so it needs no
   polling and learns its rank and round at once.
4. Every member of round k + 1 initialises the default group on the round's prefix (`join`) and the training
   runtime rebuilds its mesh over it; the snapshot logic decides the step they all go back to.

Decisions:

- torch.distributed directly, not torchft: torchft's managers heal a replica from a live peer, but it has no
  DeepSpeed integration, its DDP wrapper crashes when a peer dies in the gradient all-reduce, and a late replica
  silently restarts from step 0 (issue 13). What in-place recovery needs from the transport is only "destroy
  the groups, make new ones with new members in the same process", which gloo does in milliseconds:
  tests/trainer/recovery/test_regroup.py prints it (here: the survivor saw the error 16 ms after the kill and
  was in a new group with a hot spare 19 ms after it). NCCL's equivalent is `abort` and a new
  communicator, to be measured on a GPU machine.
- The round number is in the key's name rather than in a counter read and compared: `TCPStore.wait` blocks
  until a key exists, which is exactly "until the next round opens", with the store's own timeout.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

OPEN = "open"  # round-<k>/open: the round's world size, written last


def round_prefix(round_: int) -> str:
    return f"round-{round_}/"


def assignment_key(member: str) -> str:
    return f"assign/{member}"


def open_round(store: dist.Store, round_: int, *, world_size: int, assignments: dict[str, int]) -> None:
    """The coordinator opens `round_`: newcomers' ranks first, then the round itself (what survivors wait for)."""
    for member, rank in assignments.items():
        if not 0 <= rank < world_size:
            raise ValueError(f"assignment of {member}: rank {rank} is outside the world of {world_size}")
        store.set(assignment_key(member), f"{round_}:{rank}")
    store.set(round_prefix(round_) + OPEN, str(world_size))


class RoundSuperseded(RuntimeError):
    """A newer round opened while this rank was still forming an older one's group (a member of it was lost):
    the rank goes on to the newer round."""


ARRIVAL_SLICE_S = 0.5  # how often a rank waiting for its round's members asks whether a newer round opened


def _wait_for_members(store: dist.Store, round_: int, key: str, *, timeout_s: float) -> None:
    """Wait for `key` (every member arrived), in slices: a member lost before arriving never comes, and the
    controller then opens the next round, which ends this wait (RoundSuperseded) instead of its full timeout."""
    newer = round_prefix(round_ + 1) + OPEN
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            store.wait([key], timedelta(seconds=max(min(ARRIVAL_SLICE_S, left), 0.01)))
            return
        except dist.DistStoreError:
            if store.check([newer]):
                raise RoundSuperseded(f"round {round_ + 1} opened while round {round_} was forming") from None
            if left <= 0:
                raise


def wait_for_round(store: dist.Store, round_: int, *, timeout_s: float) -> int:
    """Block until the coordinator opens `round_`; its world size."""
    key = round_prefix(round_) + OPEN
    store.wait([key], timedelta(seconds=timeout_s))
    return int(store.get(key))


def wait_for_assignment(store: dist.Store, member: str, *, timeout_s: float) -> tuple[int, int]:
    """A spare waits until it is given a rank: (round, rank)."""
    key = assignment_key(member)
    store.wait([key], timedelta(seconds=timeout_s))
    round_, rank = store.get(key).decode().split(":")
    return int(round_), int(rank)


def join(
    store: dist.Store,
    round_: int,
    *,
    rank: int,
    world_size: int,
    backend: str,
    timeout_s: float,
    connect_timeout_s: float = 30.0,
    attempts: int = 5,
) -> int:
    """Make this process rank `rank` of round `round_`'s default group (collective with every member); the
    attempt that succeeded.

    Each attempt has a prefix of its own (`round-k/try-j/`): the members first all arrive (a counter on the store,
    so no one starts connecting while another is still on an older attempt), then make the group with a short
    connect timeout and meet in a barrier. A member whose group could not be made leaves, and so does every member
    whose barrier then times out; all of them go on to the next attempt together (a connection refused, a peer
    that never came: the round stays usable). The group's collectives then get `timeout_s`."""
    for attempt in range(attempts):
        prefix = f"{round_prefix(round_)}try-{attempt}/"
        if int(store.add(prefix + "arrived", 1)) == world_size:
            store.set(prefix + "all", "1")
        _wait_for_members(store, round_, prefix + "all", timeout_s=max(timeout_s, connect_timeout_s))
        try:
            dist.init_process_group(
                backend,
                store=dist.PrefixStore(prefix, store),
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=connect_timeout_s),
            )
            dist.barrier()
        except RuntimeError as err:  # DistError and gloo's own errors alike
            print(
                f"regroup: round {round_} attempt {attempt} failed on rank {rank} ({str(err).splitlines()[0][:160]})",
                file=sys.stderr,
                flush=True,
            )
            leave()
            continue
        _set_pg_timeout(timedelta(seconds=timeout_s))  # private, but the only way to lengthen a made group's
        return attempt
    raise RuntimeError(f"regroup: round {round_}: no group after {attempts} attempts")


def leave() -> None:
    """Destroy every group of this process's round (after a failure: the groups are broken, and a collective
    on them would only fail again). Through DeepSpeed when its communication layer is set up in this process:
    its destroy also drops the groups DeepSpeed keeps for itself (deepspeed.utils.groups), which would
    otherwise outlive the round and be used by the next engine."""
    if not dist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
