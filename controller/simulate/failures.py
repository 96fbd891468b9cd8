"""The failure model: what interrupts a job, how often, and how vlctl sees it.

Rates are per 1,000 node-days (a node of `gpus_per_node` GPUs), the unit of Llama 3's Table 5 (54 days on 16,384
H100s: 419 unexpected interruptions, 47 planned). Each cause says how the controller sees it and whether the
machine comes back:

    crash       a rank process dies with an error code (a software bug, an Xid that kills the process)
    node_lost   the node disappears without an exit status (host down, link down, PSU): EXIT_LOST
    hang        every rank stops progressing and nothing exits (a collective that never returns): the
                controller's own hang timeout finds it
    planned     maintenance with notice: the ranks stop gracefully after saving (SIGTERM, exit 75)

`returns: false` means the machine needs repair: the slot gets another machine (its lemon status resets);
`returns: true` means the same machine comes back (a reboot, a restarted daemon). A machine that comes back
after a failure is a lemon with probability `lemon.probability`, and fails `lemon.factor` times as often from
then on (the "fails again" nodes of ByteRobust and Meta's research-cluster study).

Stragglers (fail-slow nodes) arrive at `stragglers.rate`; while one lasts the synchronous job steps at
`slowdown` x its pace; its duration is lognormal (heavy-tailed) with the given median and sigma.

Decisions:

- Arrivals are Poisson per node: the job-wide process is Poisson with the summed rate, the node drawn in
  proportion to its rate (lemons weigh more). Rates are in wall time whether or not the job runs.
- A YAML file gives any other model; every problem is one `FailureModelError` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEEN_AS = ("crash", "node_lost", "hang", "planned")
MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "llama3"
SECONDS_PER_DAY = 86_400.0


class FailureModelError(ValueError):
    """A malformed failure model: one line naming the file and the field."""


@dataclass(frozen=True, slots=True)
class Cause:
    name: str
    rate: float  # per 1,000 node-days
    seen_as: str  # one of SEEN_AS
    returns: bool  # the same machine comes back after it


@dataclass(frozen=True, slots=True)
class Stragglers:
    rate: float = 0.0  # episodes per 1,000 node-days
    slowdown: float = 1.3  # the job's step time while one lasts, over its healthy pace
    median_seconds: float = 3600.0
    sigma: float = 1.5  # of the duration's log: 1.5 puts the 95th percentile at ~12x the median


@dataclass(frozen=True, slots=True)
class Lemons:
    probability: float = 0.0  # a machine that comes back after a failure is a lemon with this probability
    factor: float = 1.0  # its failure rate, over a healthy machine's


@dataclass(frozen=True, slots=True)
class FailureModel:
    name: str
    source: str  # where it was read from (for reports)
    causes: tuple[Cause, ...]
    stragglers: Stragglers = field(default_factory=Stragglers)
    lemons: Lemons = field(default_factory=Lemons)

    @property
    def rate_per_node_day(self) -> float:
        return sum(c.rate for c in self.causes) / 1000.0

    def rate_per_node_second(self, *, unplanned_only: bool = False) -> float:
        causes = [c for c in self.causes if not (unplanned_only and c.seen_as == "planned")]
        return sum(c.rate for c in causes) / 1000.0 / SECONDS_PER_DAY

    def cause(self, name: str) -> Cause:
        for c in self.causes:
            if c.name == name:
                return c
        raise FailureModelError(f"{self.source}: causes: unknown cause {name!r}")

    def only(self, names: list[str]) -> FailureModel:
        """The model with only the named causes (validation runs, what-ifs)."""
        return FailureModel(
            self.name, self.source, tuple(self.cause(n) for n in names), self.stragglers, self.lemons
        )


def load_failure_model(name_or_path: str) -> FailureModel:
    """A model shipped in controller/simulate/models/ by name (`llama3`, `meta-research`), or a YAML file."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = MODELS_DIR / f"{name_or_path}.yaml"
    return parse_failure_model(read_yaml(path, FailureModelError), source=str(path))


def read_yaml(path: Path, error: type[ValueError]) -> Any:
    """A YAML file's content; `error` with one line naming the file when it cannot be read or parsed."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


def parse_failure_model(raw: Any, *, source: str = "failure model") -> FailureModel:
    if not isinstance(raw, Mapping):
        raise FailureModelError(f"{source}: expected a mapping at the top level")
    _only_keys(raw, {"name", "description", "causes", "stragglers", "lemons"}, source, "")
    causes_raw = raw.get("causes")
    if not isinstance(causes_raw, Mapping) or not causes_raw:
        raise FailureModelError(
            f"{source}: causes: expected a mapping of cause -> {{rate, seen_as, returns}}"
        )
    causes = []
    for name, c in causes_raw.items():
        where = f"causes.{name}"
        if not isinstance(c, Mapping):
            raise FailureModelError(f"{source}: {where}: expected a mapping with rate, seen_as, returns")
        _only_keys(c, {"rate", "seen_as", "returns"}, source, where)
        seen = c.get("seen_as")
        if seen not in SEEN_AS:
            raise FailureModelError(
                f"{source}: {where}.seen_as: expected one of {', '.join(SEEN_AS)}, got {seen!r}"
            )
        returns = c.get("returns", False)
        if not isinstance(returns, bool):
            raise FailureModelError(f"{source}: {where}.returns: expected true or false, got {returns!r}")
        causes.append(Cause(str(name), _number(c.get("rate"), source, f"{where}.rate"), seen, returns))
    s = raw.get("stragglers") or {}
    if not isinstance(s, Mapping):
        raise FailureModelError(f"{source}: stragglers: expected a mapping")
    _only_keys(s, {"rate", "slowdown", "median_seconds", "sigma"}, source, "stragglers")
    stragglers = Stragglers(
        **{k: _number(v, source, f"stragglers.{k}") for k, v in s.items()}  # type: ignore[arg-type]
    )
    if stragglers.slowdown < 1:
        raise FailureModelError(f"{source}: stragglers.slowdown: must be >= 1, got {stragglers.slowdown}")
    lm = raw.get("lemons") or {}
    if not isinstance(lm, Mapping):
        raise FailureModelError(f"{source}: lemons: expected a mapping")
    _only_keys(lm, {"probability", "factor"}, source, "lemons")
    lemons = Lemons(**{k: _number(v, source, f"lemons.{k}") for k, v in lm.items()})  # type: ignore[arg-type]
    if lemons.probability > 1:
        raise FailureModelError(f"{source}: lemons.probability: must be <= 1, got {lemons.probability}")
    return FailureModel(str(raw.get("name") or Path(source).stem), source, tuple(causes), stragglers, lemons)


def _only_keys(raw: Mapping[str, Any], allowed: set[str], source: str, where: str) -> None:
    for key in raw:
        if key not in allowed:
            at = f"{where}.{key}" if where else str(key)
            raise FailureModelError(f"{source}: {at}: unknown field (expected {', '.join(sorted(allowed))})")


def _number(value: Any, source: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise FailureModelError(f"{source}: {where}: expected a number >= 0, got {value!r}")
    return float(value)
