"""The stop signals of the long-running commands (`vlctl run`, `vlctl controller`, `vlctl demo`).

Decisions:

- One meaning for SIGINT (Ctrl-C), SIGTERM (`kill`, systemd, a container stop) and SIGHUP (the terminal went
  away): "stop now, cleanly". The handler only records the signal and sets the loop's stop event; the command
  decides what stopping means once its current reconcile pass is over (never mid-transaction), so a kill can
  not leave the store half-written or the job `running` behind a dead `vlctl run`.
- A signal the caller ignores stays ignored: `nohup` ignores SIGHUP and a shell's `cmd &` (or
  `trap '' INT`) ignores SIGINT on purpose, and a half-obeyed signal (ranks stopped, job not cancelled) is the
  worst outcome. SIGTERM is always honoured: it is how supervisors stop programs.
- Handlers can only be installed on the main thread; elsewhere (a test calling `supervise` from a thread) the
  caller's own stop event is the only way in.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(slots=True)
class StopRequest:
    """Which stop signal arrived first (None: none)."""

    signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """The shell's convention for "ended by signal N": 128 + N (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signum or 0)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[StopRequest]:
    """Within the block, a stop signal sets `stop` and is recorded in the yielded StopRequest."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        if request.signum is None:
            request.signum = signum
        # Not `stop.set()` here: the handler runs on the main thread between two bytecodes, possibly while that
        # thread holds the event's (non-reentrant) lock inside `stop.wait`, and setting it would deadlock.
        threading.Thread(target=stop.set, name="stop-signal", daemon=True).start()

    previous = {}
    for sig in STOP_SIGNALS:
        current = signal.getsignal(sig)
        if current == signal.SIG_IGN and sig != signal.SIGTERM:
            continue
        previous[sig] = current
        signal.signal(sig, handle)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
