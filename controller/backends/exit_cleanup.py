"""Gangs die with the controller that launched them, unless it detached them.

Decisions:

- atexit covers a normal exit; SIGTERM and SIGINT get a handler (installed on the first launch, when that happens
  on the main thread, where Python runs handlers) that cancels the gangs and then does what the previous
  handler would have: call it, ignore the signal, or die of it with the default action, so the caller still
  sees "killed by SIGTERM".
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
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            signal.signal(sig, _make_handler(previous))


def unregister(gang: Cancellable) -> None:
    with _lock:
        if gang in _live:
            _live.remove(gang)


def cleanup() -> None:
    with _lock:
        gangs = [g for g in _live if not g.detached]
    for gang in gangs:
        gang.cancel(EXIT_GRACE_SECONDS)


def _make_handler(previous: Any):
    def handle(signum: int, frame: Any) -> None:
        cleanup()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_IGN:
            return
        else:  # default action: die of the signal, as the caller expects
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handle
