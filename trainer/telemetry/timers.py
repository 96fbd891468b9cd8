"""Phase timing of one rank's steps, and the sync point that turns waiting into a straggler signal.

What is measured (seconds, `time.perf_counter`):

- wall: `start_step()` to `end_step()`.
- a phase (data, forward, backward, optimizer): the time inside `with timer.phase(name)`, summed over the step's
  micro-steps, minus the time of collectives nested in it (pipeline sends inside forward, for instance).
- collective_wait: the time inside `with timer.collective()` or a `timed_collective` function, wherever it runs:
  transfer time plus waiting for peers.
- sync_wait: the part of collective_wait spent in `sync_point`. Every rank reaches it right after its compute and
  leaves it when the slowest rank arrives, so it is how long this rank waited for the slowest one: long on fast
  ranks, about zero on the straggler. The ranks leave it aligned, so the gradient all-reduce that follows measures
  transfer rather than waiting.
- own_work = data + forward + backward + optimizer: this rank's own speed, the straggler signal. The wall time
  is no signal: in synchronous data parallelism the collectives make every rank's step as long as the slowest's.
- wall - sum(phases) is untimed work (logging, the loop itself).

CUDA runs kernels asynchronously, so a clock read right after a launch would charge the kernel to whichever
later phase happens to wait for it. When CUDA is in use every clock read is preceded by
`torch.cuda.synchronize()` (which also waits for NCCL's streams). The price is the CPU/GPU overlap lost at a few
points per micro-step; `cuda_sync=False` turns it off, and the times then measure launches, not execution.
"In use" means torch is already imported and CUDA is initialised: this module imports torch only in `sync_point`.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from trainer.contract.telemetry import OWN_WORK_PHASES, PHASES

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class StepTimes:
    step: int
    wall: float
    phases: dict[str, float]  # every name in PHASES; 0.0 for a phase the step did not have
    sync_wait: float

    @property
    def own_work(self) -> float:
        return sum(self.phases[p] for p in OWN_WORK_PHASES)

    def metrics(self) -> dict[str, float]:
        """The contract's keys for a sink's metrics dict."""
        out = {
            "step_seconds": self.wall,
            "own_work_seconds": self.own_work,
            "sync_wait_seconds": self.sync_wait,
        }
        out.update({f"phase_seconds/{p}": t for p, t in self.phases.items()})
        return out


@dataclass(slots=True)
class _OpenPhase:
    name: str
    start: float
    excluded: float = 0.0  # collective time nested in it


class StepTimer:
    """Records one step at a time: `start_step`, phases and collectives in any order, `end_step`."""

    def __init__(self, *, cuda_sync: bool | None = None, clock: Callable[[], float] = time.perf_counter):
        """cuda_sync: None synchronises when CUDA is in use; True requires CUDA; False never synchronises."""
        if cuda_sync is True and not _cuda_initialised():
            raise ValueError("cuda_sync: True needs torch imported and CUDA initialised")
        self._cuda_sync = cuda_sync
        self._cuda_seen = False  # CUDA, once initialised, stays so: stop asking
        self._clock = clock
        self._step: int | None = None
        self._start = 0.0
        self._phases = dict.fromkeys(PHASES, 0.0)
        self._sync_wait = 0.0
        self._open: _OpenPhase | None = None
        self._in_collective = False

    @property
    def step(self) -> int | None:
        """The step being timed, None between steps."""
        return self._step

    def start_step(self, step: int) -> None:
        if self._step is not None:
            raise RuntimeError(f"start_step({step}): step {self._step} has not ended")
        self._phases = dict.fromkeys(PHASES, 0.0)
        self._sync_wait = 0.0
        self._step = step
        self._start = self._now()

    def abandon_step(self) -> None:
        """Forget the step in flight (it was cut short by a lost peer and is done again after the recovery)."""
        self._step, self._open, self._in_collective = None, None, False

    def end_step(self) -> StepTimes:
        if self._step is None:
            raise RuntimeError("end_step: no step started")
        if self._open is not None:
            raise RuntimeError(f"end_step: phase {self._open.name!r} is still open")
        wall = self._now() - self._start
        times = StepTimes(step=self._step, wall=wall, phases=dict(self._phases), sync_wait=self._sync_wait)
        self._step = None
        return times

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in OWN_WORK_PHASES:
            raise ValueError(f"phase: unknown phase {name!r}; expected one of {', '.join(OWN_WORK_PHASES)}")
        if self._step is None:
            raise RuntimeError(f"phase {name!r}: no step started")
        if self._open is not None or self._in_collective:
            # Overlapping phases would count the same seconds twice.
            inside = f"phase {self._open.name!r}" if self._open else "a collective"
            raise RuntimeError(f"phase {name!r} started inside {inside}")
        self._open = frame = _OpenPhase(name, self._now())
        try:
            yield
        finally:
            self._open = None
            self._phases[name] += self._now() - frame.start - frame.excluded

    @contextmanager
    def collective(self, *, sync: bool = False) -> Iterator[None]:
        """Time inside counts as collective_wait (and sync_wait when `sync`), and not as the enclosing phase.
        A collective nested in another, or outside a step (setup broadcasts), is not timed."""
        if self._step is None or self._in_collective:
            yield
            return
        self._in_collective = True
        start = self._now()
        try:
            yield
        finally:
            self._in_collective = False
            spent = self._now() - start
            self._phases["collective_wait"] += spent
            if sync:
                self._sync_wait += spent
            if self._open is not None:
                self._open.excluded += spent

    def record_collective(self, seconds: float) -> None:
        """Add time blocked in communication measured elsewhere (pipeline transfers) to collective_wait."""
        if self._step is not None and seconds > 0:
            self._phases["collective_wait"] += seconds

    def own_work_so_far(self) -> float:
        """Own work of the current step up to now, an open phase included."""
        done = sum(self._phases[p] for p in OWN_WORK_PHASES)
        if self._open is not None:
            done += self._clock() - self._open.start - self._open.excluded
        return done

    def _now(self) -> float:
        if self._cuda_sync is not False and (self._cuda_seen or _cuda_initialised()):
            self._cuda_seen = True
            sys.modules["torch"].cuda.synchronize()
        return self._clock()


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


def timed_collective(timer: StepTimer, fn: F) -> F:
    """`fn` with its calls timed as collective_wait, e.g. `all_reduce = timed_collective(timer, dist.all_reduce)`.
    For `async_op=True` calls this times the launch only: time the returned work's `wait()` instead."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with timer.collective():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def sync_point(timer: StepTimer, group: Any = None, *, flag: bool = False) -> bool:
    """Meet every rank of `group` (default: the world) with a one-element all_reduce, timed as sync_wait.

    Place it right after the step's compute (after backward, before gradient synchronisation). It also carries a
    flag: the result is True when any rank passed `flag=True`, so a stop request seen by one rank (SIGTERM) becomes a
    decision every rank takes at the same step. Without an initialised process group it returns `flag`.
    """
    return sync_flags(timer, (flag,), group)[0]


def sync_flags(timer: StepTimer | None, flags: Sequence[bool], group: Any = None) -> tuple[bool, ...]:
    """`sync_point` carrying several flags in its one all_reduce: each result is True when any rank passed True
    for it. Without a timer it is not timed (a meeting outside a step)."""
    return sync_values(timer, flags, (), group)[0]


def sync_values(
    timer: StepTimer | None, flags: Sequence[bool], minima: Sequence[int], group: Any = None
) -> tuple[tuple[bool, ...], tuple[int, ...]]:
    """`sync_flags` that also agrees on integers: each of `minima` becomes the smallest any rank passed (in-place
    recovery's committed snapshot step). One all_reduce (MAX) for both: a minimum is the maximum of negatives, and
    float64 holds every integer below 2**53 exactly."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return tuple(bool(f) for f in flags), tuple(int(m) for m in minima)
    on_gpu = "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    value = torch.tensor(
        [1.0 if f else 0.0 for f in flags] + [-float(m) for m in minima], dtype=torch.float64, device=device
    )
    with timer.collective(sync=True) if timer is not None else nullcontext():
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    out = value.tolist()
    return tuple(bool(v > 0) for v in out[: len(flags)]), tuple(int(-v) for v in out[len(flags) :])
