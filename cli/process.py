"""The CLI process's start and end: most commands read a row or two and print, so the interpreter's own start-up
and teardown are a large share of what they cost (`bench/bench_cli_startup.py`).

Decisions:

- The cyclic garbage collector is off from the start: start-up allocates a few hundred thousand objects (the
  imported modules' functions, classes and constants) that live as long as the process, and the collections
  they trigger find nothing to free. A command that runs for long (`controller`, `run`, `operator`, `demo`)
  turns it back on first thing (`long_running`).
- A short command ends with `os._exit` once its output is flushed: the interpreter's teardown (freeing every
  module's objects one by one, a tenth of a second with SQLAlchemy loaded) does nothing a finished command
  needs. Long-running commands exit normally, so atexit handlers (logging, multiprocessing, threads' joins) run.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys

_long_running = False


def fast_start() -> None:
    gc.disable()


def long_running() -> None:
    """This command runs for long: collect garbage, and exit through the interpreter's normal teardown."""
    global _long_running
    _long_running = True
    gc.enable()


def finish(code: int | str | None) -> None:
    """End the process with `code` (sys.exit's meaning: None is 0, a string is printed and means 1)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    code = code or 0
    if _long_running:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        # The reader left, or the stream is closed: nothing is left to keep.
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.flush()
    os._exit(code)
