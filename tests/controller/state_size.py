"""Bytes held by a telemetry source's state between polls, for the ingest's bounded-state checks."""

from __future__ import annotations

import sys

import numpy as np

from controller.ingest import JsonlTelemetry


def deep_sizeof(obj: object, _seen: set[int] | None = None) -> int:
    """Bytes held by `obj` and everything it references (each object counted once)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_sizeof(k, seen) + deep_sizeof(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple | set | frozenset):
        size += sum(deep_sizeof(v, seen) for v in obj)
    elif hasattr(obj, "__slots__"):
        slots = [s for cls in type(obj).__mro__ for s in getattr(cls, "__slots__", ())]
        size += sum(deep_sizeof(getattr(obj, s), seen) for s in slots if hasattr(obj, s))
    return size


def jsonl_state_nbytes(source: JsonlTelemetry) -> int:
    """What a JSONL source keeps per rank: its read cursors and rank state columns (not its file paths)."""
    columns = sum(sys.getsizeof(a) for a in vars(source._columns).values() if isinstance(a, np.ndarray))
    return deep_sizeof(source._cursors) + columns
