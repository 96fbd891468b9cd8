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


STREAMED_LIST_MIN = 256  # a longer list under a JSON object's "ranks" is written an item a line, as it goes


def emit(data: Any, fmt: OutputFormat, render: Callable[[Any], Any]) -> None:
    """Print `data` as JSON alone on stdout, or as what `render` returns (a rich renderable or text)."""
    if fmt is OutputFormat.json:
        ranks = data.get("ranks") if isinstance(data, dict) else None
        if isinstance(ranks, list) and len(ranks) >= STREAMED_LIST_MIN:
            _stream_ranks(data, ranks)
        else:
            print(json.dumps(data, indent=2, default=str))
    else:
        stdout.print(render(data))


def _stream_ranks(data: dict[str, Any], ranks: list[Any]) -> None:
    """The same JSON document, its long "ranks" list last, one compact item a line, written in batches: a
    16,384-rank job's status starts printing at once, and a reader of the pipe can take it line by line."""
    import sys

    head = json.dumps({k: v for k, v in data.items() if k != "ranks"}, indent=2, default=str)
    out = sys.stdout
    out.write(head[:-2] + ',\n  "ranks": [\n' if len(data) > 1 else '{\n  "ranks": [\n')
    dumps = json.JSONEncoder(default=str, separators=(", ", ": ")).encode
    for start in range(0, len(ranks), 1024):
        batch = ranks[start : start + 1024]
        last = start + len(batch) == len(ranks)
        out.write(",\n".join(f"    {dumps(r)}" for r in batch) + ("\n" if last else ",\n"))
    out.write("  ]\n}\n")
    out.flush()


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
