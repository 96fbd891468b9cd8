"""The first-order model of ETTR under failures and periodic checkpoints, and Young/Daly's interval.

Symbols (per physical node, explicit): N nodes, r failures per node per second (lambda = N r for the job), u0 the
fixed cost of one failure (detection, teardown, backoff, launch, load, the first step's extra), dt the compute
between checkpoints (seconds), w the blocking cost of one checkpoint. Each failure loses u0 plus on average half
an interval of work; the rest of the time splits between compute and checkpoints as dt : w:

    ETTR ~= (1 - N r (u0 + dt/2)) / (1 + w/dt),    dt* = sqrt(2 w / (N r))   (Young 1974; Daly 2006)

It is first order in N r (u0 + dt): it holds while failures are rare against a restart plus an interval, which
is where `vlctl simulate --validate` compares the simulator with it.
"""

from __future__ import annotations

import math


def ettr(*, rate: float, u0: float, dt: float, w: float) -> float:
    """`rate`: the job's failure rate N r (per second)."""
    if dt <= 0:
        raise ValueError(f"dt: must be > 0, got {dt}")
    return (1.0 - rate * (u0 + dt / 2.0)) / (1.0 + w / dt)


def young_daly(*, rate: float, w: float) -> float:
    if rate <= 0:
        raise ValueError(f"rate: must be > 0, got {rate}")
    return math.sqrt(2.0 * w / rate)
