"""Fault injection for chaos tests of the controller, and the loop's graceful stop on SIGTERM.

Faults come from a typed `FaultConfig`, or from the environment (`FaultConfig.from_env`):

- VLCTL_FAULT_CRASH_AT_STEP=N: the rank dies at the start of step N (steps before N completed), in the way
  VLCTL_FAULT_CRASH_MODE says:
  `exit` (default): `os._exit(EXIT_FAULT_CRASH)` (97). No exception, no `finally`, no atexit: what a hard failure
  (a driver abort, a segfault in a kernel) looks like from outside, with a code that marks it as injected.
  `raise`: an `InjectedCrash` exception: a Python error with a traceback, `finally` blocks run, exit status 1.
  `kill`: SIGKILL to itself, like the kernel's OOM killer: status -9 to the parent (137 in a shell).
- VLCTL_FAULT_CRASH_IN=WHERE[,WHERE]: where the crash comes (default `step`, as above); each place fires once:
  `snapshot`: halfway through copying the in-memory snapshot of step N (in-place recovery), so the half-made
  snapshot is on record when the rank dies (`raise` acts as `exit` there: the copy runs in the replicator's
  thread, where an exception would not end the rank);
  `restore`: halfway through this rank's first in-place restore (the replica received, the engine not yet
  restored); N does not apply. With VLCTL_FAULT_RANK, the spare that takes the rank over inherits it.
- VLCTL_FAULT_HANG_AT_STEP=N: at the start of step N the training thread waits forever on an event nobody sets.
  The process stays alive and its metrics endpoint (other threads) keeps answering, while the progress timestamp
  stops: what a rank stuck in a collective looks like. With `GracefulStop` installed a SIGTERM is recorded but
  never acted on, so only SIGKILL ends it, as with a real hang in NCCL.
- VLCTL_FAULT_SLOW_FACTOR=F from VLCTL_FAULT_SLOW_FROM_STEP=N (default 0): `slow_down` sleeps (F - 1) x the
  step's own work so far, timed as the backward phase, so own work grows about F-fold (the optimizer phase after
  it is not scaled), like a throttled GPU; the other ranks wait for it at the sync point.
- VLCTL_FAULT_RANK=R: only global rank R is affected (default: every rank).
- VLCTL_FAULT_ONCE_DIR=DIR: each fault fires once per job, not once per process: firing leaves the marker
  `DIR/{crash,crash-snapshot,crash-restore,hang,slow}-rank{R}` and a marker already there disarms it. Without it a crash at step N recurs
  after every resume from a checkpoint before N.

A fault announces itself with one line on stderr before acting, so a chaos test's logs say what happened.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from trainer.contract.telemetry import (
    ENV_FAULT_CRASH_AT_STEP,
    ENV_FAULT_CRASH_IN,
    ENV_FAULT_CRASH_MODE,
    ENV_FAULT_HANG_AT_STEP,
    ENV_FAULT_ONCE_DIR,
    ENV_FAULT_RANK,
    ENV_FAULT_SLOW_FACTOR,
    ENV_FAULT_SLOW_FROM_STEP,
    EXIT_FAULT_CRASH,
    EXIT_PREEMPTED,
)
from trainer.telemetry.timers import StepTimer

log = logging.getLogger("trainer.faults")
CRASH_MODES = ("exit", "raise", "kill")
CRASH_PLACES = ("step", "snapshot", "restore")


class InjectedCrash(RuntimeError):
    pass


@dataclass(kw_only=True, slots=True)
class FaultConfig:
    crash_at_step: int | None = None
    crash_mode: str = "exit"
    crash_in: tuple[str, ...] = ("step",)  # CRASH_PLACES
    hang_at_step: int | None = None
    slow_factor: float = 1.0  # 1: not slowed
    slow_from_step: int = 0
    rank: int | None = None  # None: every rank
    once_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.crash_mode not in CRASH_MODES:
            raise ValueError(
                f"faults.crash_mode: expected one of {', '.join(CRASH_MODES)}, got {self.crash_mode!r}"
            )
        if bad := [p for p in self.crash_in if p not in CRASH_PLACES]:
            raise ValueError(f"faults.crash_in: expected {', '.join(CRASH_PLACES)}, got {', '.join(bad)}")
        if not 1.0 <= self.slow_factor < math.inf:
            raise ValueError(f"faults.slow_factor: must be a finite number >= 1, got {self.slow_factor}")
        for name in ("crash_at_step", "hang_at_step", "slow_from_step", "rank"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"faults.{name}: must be >= 0, got {value}")

    @property
    def active(self) -> bool:
        crash = self.crash_at_step is not None or "restore" in self.crash_in
        return crash or self.hang_at_step is not None or self.slow_factor > 1.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FaultConfig:
        def number(env: str, kind: type) -> int | float | None:
            raw = environ.get(env, "").strip()
            if not raw:
                return None
            try:
                return kind(raw)
            except ValueError:
                raise ValueError(
                    f"{env}: expected {'an integer' if kind is int else 'a number'}, got {raw!r}"
                ) from None

        values: dict = {
            "crash_at_step": number(ENV_FAULT_CRASH_AT_STEP, int),
            "hang_at_step": number(ENV_FAULT_HANG_AT_STEP, int),
            "rank": number(ENV_FAULT_RANK, int),
        }
        if (factor := number(ENV_FAULT_SLOW_FACTOR, float)) is not None:
            values["slow_factor"] = factor
        if (start := number(ENV_FAULT_SLOW_FROM_STEP, int)) is not None:
            values["slow_from_step"] = start
        if mode := environ.get(ENV_FAULT_CRASH_MODE, "").strip():
            values["crash_mode"] = mode
        if places := environ.get(ENV_FAULT_CRASH_IN, "").strip():
            values["crash_in"] = tuple(p.strip() for p in places.split(",") if p.strip())
        if once := environ.get(ENV_FAULT_ONCE_DIR, "").strip():
            values["once_dir"] = Path(once)
        return cls(**values)


class FaultInjector:
    """Call `before_step(step)` at the top of each step and `slow_down(step, timer)` after backward; in-place
    recovery calls `in_snapshot(step)` halfway through a snapshot's copy and `in_restore()` halfway through a
    restore."""

    def __init__(self, config: FaultConfig, *, rank: int):
        self.config = config
        self.rank = rank
        self._targeted = config.rank is None or config.rank == rank
        self._fired: set[str] = set()

    def before_step(self, step: int) -> None:
        c = self.config
        if not self._targeted:
            return
        if "step" in c.crash_in and c.crash_at_step == step and self._arm("crash"):
            self._crash(f"at step {step}")
        if c.hang_at_step == step and self._arm("hang"):
            self._announce(f"hang at step {step}")
            forever = threading.Event()
            while True:  # a signal handler may wake the wait; a hung rank goes back to waiting
                forever.wait()

    def in_snapshot(self, step: int) -> None:
        c = self.config
        if (
            self._targeted
            and "snapshot" in c.crash_in
            and c.crash_at_step == step
            and self._arm("crash-snapshot")
        ):
            self._crash(f"halfway through the snapshot of step {step}", may_raise=False)

    def in_restore(self, step: int) -> None:
        if self._targeted and "restore" in self.config.crash_in and self._arm("crash-restore"):
            self._crash(f"halfway through restoring step {step}")

    def _crash(self, where: str, *, may_raise: bool = True) -> None:
        c = self.config
        self._announce(f"crash ({c.crash_mode}) {where}")
        if c.crash_mode == "raise" and may_raise:
            raise InjectedCrash(f"injected crash {where} on rank {self.rank}")
        if c.crash_mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(EXIT_FAULT_CRASH)

    def slow_down(self, step: int, timer: StepTimer, *, rest_of_step: float = 0.0) -> float:
        """Sleeps (factor - 1) x the step's own work when slowing applies; returns the seconds slept.

        Called before the step's end (before the sync point, so the slowness shows as straggling), it sees the
        own work so far; `rest_of_step` is the caller's estimate of what is still to come (the optimizer's time
        in the previous step), so the whole step's own work grows by the factor."""
        c = self.config
        if not (self._targeted and c.slow_factor > 1.0 and step >= c.slow_from_step and self._arm("slow")):
            return 0.0
        if "slow-announced" not in self._fired:
            self._fired.add("slow-announced")
            self._announce(f"slow x{c.slow_factor:g} from step {step}")
        extra = (c.slow_factor - 1.0) * (timer.own_work_so_far() + rest_of_step)
        with timer.phase("backward"):
            time.sleep(extra)
        return extra

    def _arm(self, kind: str) -> bool:
        """Whether the fault may fire: always without once_dir, else only if no earlier process fired it."""
        if self.config.once_dir is None or kind in self._fired:
            return True
        marker = self.config.once_dir / f"{kind}-rank{self.rank}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        self._fired.add(kind)
        return True

    def _announce(self, what: str) -> None:
        print(f"vlctl fault injection: rank {self.rank} {what}", file=sys.stderr, flush=True)


class GracefulStop:
    """Records SIGTERM (by default) instead of dying, so the loop can finish its step, save and exit with
    EXIT_PREEMPTED:

        with GracefulStop() as stop:
            for step in ...:
                ...                                   # the whole step
                if sync_point(timer, flag=stop.requested):   # or stop.requested on a single process
                    save_checkpoint(...)
                    stop.exit()

    Across ranks the signal lands at different moments; agreeing through `sync_point` makes every rank stop after
    the same step, so none is left waiting in a collective. Repeated signals change nothing. Install it from the
    main thread (Python delivers signals there only); the previous handlers come back on exit.
    """

    exit_code = EXIT_PREEMPTED

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        # Only flags here: the handler interrupts arbitrary code, the loop acts at its next step boundary.
        if not self.requested:
            self.requested, self.signal = True, signum

    def request(self) -> None:
        self.requested = True

    def exit(self) -> NoReturn:
        """SystemExit, so `finally` blocks still run (destroying the process group, closing sinks)."""
        name = signal.Signals(self.signal).name if self.signal else "a request"
        log.info("stopping after %s: exit code %d", name, self.exit_code)
        raise SystemExit(self.exit_code)
