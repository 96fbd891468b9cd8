"""Kubernetes resource quantities ('512Gi', '64G', '1.5Gi', '500m', '1e9'), parsed once for every reader.

The spec's `resources.cpu` and `resources.memory` are checked with it when a spec is parsed, so a value the
Kubernetes API would refuse is refused at submit for every backend; the memory check and the local backend's
per-rank limit read bytes from it, and the pod renderer passes the checked text through unchanged.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

# The API server's grammar: an optional sign, a decimal number, then a binary suffix, a decimal SI suffix, or a
# decimal exponent. A negative request is meaningless for a resource, so only '+' is accepted.
_QUANTITY = re.compile(
    r"^\+?(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<suffix>[eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"
)
_SUFFIXES = {
    None: Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    **{f"{p}i": Decimal(2) ** (10 * (i + 1)) for i, p in enumerate("KMGTPE")},
}


def parse_quantity(text: str) -> Decimal:
    """The quantity's value; ValueError (naming the text) when the Kubernetes API would refuse it."""
    match = _QUANTITY.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. '32', '500m', '512Gi', '64G')")
    suffix = match["suffix"]
    try:
        number = Decimal(match["number"])
        if suffix is not None and suffix[0] in "eE":
            return number * Decimal(10) ** int(suffix[1:])
        return number * _SUFFIXES[suffix]
    except (InvalidOperation, OverflowError):
        raise ValueError(f"{text!r} is not a Kubernetes quantity (out of range)") from None


def quantity_bytes(text: str) -> int:
    """A memory quantity in whole bytes (a fraction of a byte rounds up, as the API server does)."""
    return math.ceil(parse_quantity(text))
