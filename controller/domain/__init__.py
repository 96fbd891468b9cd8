"""The controller's domain: a job's phases and the one state machine that changes them.

- phases: the vocabulary (`Phase`, `EventType`, `Reason`); pure, imported by the store's models.
- states: the state machine, the only code that writes a job's phase; import it as
  `controller.domain.states`. It is not re-exported here because it depends on the store, whose models depend
  on `phases`: importing it from this `__init__` would make the two packages import each other.
"""

from .phases import ACTIVE_PHASES, SUPERVISED_PHASES, TERMINAL_PHASES, EventType, Phase, Reason, is_camel_case

__all__ = [
    "ACTIVE_PHASES",
    "SUPERVISED_PHASES",
    "TERMINAL_PHASES",
    "EventType",
    "Phase",
    "Reason",
    "is_camel_case",
]
