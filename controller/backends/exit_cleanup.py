"""Gangs die with the controller that launched them, unless it detached them.

Decisions:

- atexit covers a normal exit, and a KeyboardInterrupt that ends the program. A signal whose disposition is
  still the default (SIGTERM kills without running atexit) gets a handler, installed on the first launch when
  that happens on the main thread (where Python runs handlers), that cancels the gangs and then dies of the
  signal, so the caller still sees "killed by SIGTERM".
- A signal the program already handles or ignores is left alone. The program's own handler decides what the
  signal means (the controller daemon detaches or stops its jobs, `vlctl run` cancels its job), and cancelling
  the gangs before it runs would take that choice away (`--on-exit detach` found its ranks already stopped).
  An ignored signal stays ignored: `(trap '' INT; vlctl run ...)` must not lose its ranks to a SIGINT.
- SIGKILL of the controller cannot be caught: its gangs live on, and a restarted controller attaches to them
  from their records (that is the crash-safe path the reconcile loop relies on).
- The controller daemon detaches gangs before a planned restart; a foreground `vlctl run` leaves nothing behind.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from typing import Any, Protocol


class Cancellable(Protocol):
    detached: bool

    def cancel(self, grace_seconds: float) -> None: ...


# Gangs this process launched and has not detached: killed when it exits.
_live: list[Cancellable] = []
_lock = threading.RLock()  # re-entrant: the signal handler may run while register() holds it
_installed = False
EXIT_GRACE_SECONDS = 5.0


def register(gang: Cancellable) -> None:
    global _installed
    with _lock:
        _live.append(gang)
        if _installed:
            return
        _installed = True
    atexit.register(cleanup)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _die_after_cleanup)


def unregister(gang: Cancellable) -> None:
    with _lock:
        if gang in _live:
            _live.remove(gang)


def cleanup() -> None:
    with _lock:
        gangs = [g for g in _live if not g.detached]
    for gang in gangs:
        gang.cancel(EXIT_GRACE_SECONDS)


def _die_after_cleanup(signum: int, frame: Any) -> None:
    cleanup()
    signal.signal(signum, signal.SIG_DFL)  # the default action: die of the signal, as the sender expects
    os.kill(os.getpid(), signum)
