"""One output path for every command: data to stdout (a table for people, `--output json` for scripts),
messages to stderr, so JSON output always parses."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Any

from rich.console import Console


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits with status 1 when the reader of a pipe leaves (`vlctl list | head`); hand it to the CLI's
        # one rule instead (cli.main: stop quietly, status 0).
        self.quiet = True
        raise BrokenPipeError


stdout = _Console(soft_wrap=True)
stderr = _Console(stderr=True, soft_wrap=True)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


def emit(data: Any, fmt: OutputFormat, render: Callable[[Any], Any]) -> None:
    """Print `data` as JSON alone on stdout, or as what `render` returns (a rich renderable or text)."""
    if fmt is OutputFormat.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        stdout.print(render(data))


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
