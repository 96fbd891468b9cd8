"""The controller's domain vocabulary: a job's phases, event types and reasons (`phases`). Pure: it imports
nothing else of the controller, and the store's models are built on it.

The state machine that changes a job's phase, the only code that writes it, is `controller.states`: it sits
above the store (it locks rows, records attempts and appends events), so it is not part of this package.
"""

from .phases import (
    ACTIVE_PHASES,
    SUPERVISED_PHASES,
    TERMINAL_PHASES,
    EventType,
    Phase,
    Reason,
    SupervisionReason,
    is_camel_case,
)

__all__ = [
    "ACTIVE_PHASES",
    "SUPERVISED_PHASES",
    "TERMINAL_PHASES",
    "EventType",
    "Phase",
    "Reason",
    "SupervisionReason",
    "is_camel_case",
]
