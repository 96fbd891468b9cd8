"""What one simulation runs: the job, its vlctl policy, the failure and cost models, the seeds.

A YAML file (`vlctl simulate SPEC`) with these sections, every field optional except `job.nodes`:

    job:     {name, nodes, gpus_per_node, step_seconds, params_billion, days}
    policy:  {recovery: restart | in-place, hot_spares, checkpoint_interval: STEPS | auto, min_interval_steps,
              max_interval_steps, expected_failures_per_day: N | model, hang_timeout_seconds, backoff_base_seconds, backoff_max_seconds,
              max_restarts, stragglers: report | exclude-node, spare_nodes}
    failure_model: llama3 | meta-research | PATH.yaml    (or {model, causes: [subset]})
    cost_model: {FIELD: VALUE}                           (controller/simulate/costs.py, over the defaults)
    simulation: {seeds, max_tracked_nodes, heartbeat_seconds}

The job becomes a real TrainingJob spec (`training_job`), submitted to the store as `vlctl submit` would, and the
controller supervises it. Granularity: the controller sees at most `max_tracked_nodes` nodes of one rank each; a
larger job's tracked node stands for a group of physical nodes (failures, costs and GPU counts stay per physical
node). Any problem is one `SimSpecError` naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from controller.simulate.costs import CostModel, CostModelError, Costs
from controller.simulate.failures import (
    DEFAULT_MODEL,
    FailureModel,
    FailureModelError,
    load_failure_model,
    read_yaml,
)

SECTIONS = ("job", "policy", "failure_model", "cost_model", "simulation")


class SimSpecError(ValueError):
    pass


@dataclass(kw_only=True)
class JobSettings:
    name: str = "sim"
    nodes: int = 2048
    gpus_per_node: int = 8
    step_seconds: float = 6.0
    params_billion: float = 405.0
    days: float = 54.0


@dataclass(kw_only=True)
class PolicySettings:
    recovery: Literal["restart", "in-place"] = "restart"
    hot_spares: int = 1
    checkpoint_interval: int | Literal["auto"] = "auto"
    # The training config's own interval: what `auto` runs at until the job has measured a save (docs/scale.md).
    trainer_interval_steps: int = 1000
    # `auto`'s prior (the spec's checkpoint_policy.expected_failures_per_day): a number, "model" (what the
    # failure model predicts for this job: its rate per node-day x the physical nodes), or None (one a day).
    expected_failures_per_day: float | Literal["model"] | None = None
    min_interval_steps: int = 1
    max_interval_steps: int = 100_000
    hang_timeout_seconds: float = 600.0
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 300.0
    max_restarts: int = 1_000_000
    stragglers: Literal["report", "exclude-node"] = "report"
    spare_nodes: int = 0


@dataclass(kw_only=True)
class SimulationSettings:
    seeds: int = 5
    max_tracked_nodes: int = 256  # the controller sees at most this many nodes (see the module docstring)
    heartbeat_seconds: float = 6 * 3600.0  # a controller pass at least this often (simulated), events or not


@dataclass(kw_only=True)
class SimSpec:
    job: JobSettings = field(default_factory=JobSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    failure_model: str = DEFAULT_MODEL
    causes: list[str] | None = None  # a subset of the model's causes
    cost_model: CostModel = field(default_factory=CostModel)
    simulation: SimulationSettings = field(default_factory=SimulationSettings)

    def load_model(self) -> FailureModel:
        model = load_failure_model(self.failure_model)
        return model.only(self.causes) if self.causes else model

    def costs(self) -> Costs:
        """The cost model at this job's size."""
        return self.cost_model.at(
            nodes=self.job.nodes,
            gpus_per_node=self.job.gpus_per_node,
            params_billion=self.job.params_billion,
            step_seconds=self.job.step_seconds,
        )

    @property
    def gpus(self) -> int:
        return self.job.nodes * self.job.gpus_per_node

    @property
    def tracked_nodes(self) -> int:
        return min(self.job.nodes, self.simulation.max_tracked_nodes)

    @property
    def group(self) -> int:
        """Physical nodes per tracked node."""
        return self.job.nodes // self.tracked_nodes

    def with_changes(
        self, *, nodes: int | None = None, recovery: str | None = None, interval: Any = None
    ) -> SimSpec:
        job = dataclasses.replace(self.job, nodes=nodes if nodes is not None else self.job.nodes)
        policy = dataclasses.replace(
            self.policy,
            recovery=recovery or self.policy.recovery,  # type: ignore[arg-type]
            checkpoint_interval=interval if interval is not None else self.policy.checkpoint_interval,
        )
        spec = dataclasses.replace(self, job=job, policy=policy)
        spec.check()
        return spec

    def check(self) -> None:
        j, p, s = self.job, self.policy, self.simulation
        _positive(j.nodes, "job.nodes", integer=True)
        _positive(j.gpus_per_node, "job.gpus_per_node", integer=True)
        _positive(j.step_seconds, "job.step_seconds")
        _positive(j.days, "job.days")
        _positive(j.params_billion, "job.params_billion")
        _positive(s.seeds, "simulation.seeds", integer=True)
        _positive(s.max_tracked_nodes, "simulation.max_tracked_nodes", integer=True)
        _positive(s.heartbeat_seconds, "simulation.heartbeat_seconds")
        if p.recovery not in ("restart", "in-place"):
            raise SimSpecError(f"policy.recovery: expected restart or in-place, got {p.recovery!r}")
        if p.stragglers not in ("report", "exclude-node"):
            raise SimSpecError(f"policy.stragglers: expected report or exclude-node, got {p.stragglers!r}")
        if p.checkpoint_interval != "auto":
            _positive(p.checkpoint_interval, "policy.checkpoint_interval", integer=True)
        if p.expected_failures_per_day not in (None, "model"):
            _positive(p.expected_failures_per_day, "policy.expected_failures_per_day")
        if p.recovery == "in-place" and self.tracked_nodes < 2:
            raise SimSpecError("job.nodes: in-place recovery needs at least 2 nodes")
        if j.nodes % self.tracked_nodes:
            raise SimSpecError(
                f"job.nodes: {j.nodes} is not a multiple of the {self.tracked_nodes} nodes the controller tracks "
                "(simulation.max_tracked_nodes)"
            )

    def expected_failures_per_day(self) -> float | None:
        """The prior the job spec gets (PolicySettings.expected_failures_per_day): "model" is the failure
        model's rate of unplanned failures (planned maintenance saves first: no work lost) per node-day times
        the physical nodes (not the tracked ones: the rate is the job's)."""
        wanted = self.policy.expected_failures_per_day
        if wanted == "model":
            return self.load_model().rate_per_node_second(unplanned_only=True) * 86_400 * self.job.nodes
        return wanted

    def training_job(self, run_dir: Path) -> dict[str, Any]:
        """The TrainingJob spec the controller supervises: one rank per tracked node, data-parallel."""
        p = self.policy
        n = self.tracked_nodes
        steps = int(self.job.days * 86_400 / self.job.step_seconds) + 10  # more than the horizon can hold
        return {
            "name": self.job.name,
            "backend": "local",  # served by the simulated backend under that name
            "resources": {
                "nodes": n,
                "procs_per_node": 1,
                "gpus_per_node": self.job.gpus_per_node,
                "spare_nodes": p.spare_nodes,
            },  # fmt: skip
            "training": {
                "model": {"name": "mini"},
                "data": {"paths": ["sim://simulated-data.jsonl"], "rows_per_step": n},
                "parallel": {"dp": n},
                "training": {"steps": steps},
                "checkpoint": {
                    "interval_steps": p.trainer_interval_steps
                    if p.checkpoint_interval == "auto"
                    else p.checkpoint_interval,
                    "keep_last": 2,
                },  # fmt: skip
                "run_dir": str(run_dir),
            },
            "checkpoint_policy": {
                "interval": p.checkpoint_interval,
                "min_interval_steps": p.min_interval_steps,
                "max_interval_steps": p.max_interval_steps,
                "expected_failures_per_day": self.expected_failures_per_day(),
            },
            "fault_tolerance": {
                "recovery": p.recovery,
                "hot_spares": p.hot_spares,
                "max_restarts": p.max_restarts,
                "backoff_base_seconds": p.backoff_base_seconds,
                "backoff_max_seconds": p.backoff_max_seconds,
                "hang_timeout_seconds": p.hang_timeout_seconds,
            },
            "stragglers": {"action": p.stragglers},
        }


def parse_sim_spec(raw: Any, *, source: str = "spec") -> SimSpec:
    if not isinstance(raw, Mapping):
        raise SimSpecError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}")
    for key in raw:
        if key not in SECTIONS:
            raise SimSpecError(f"{source}: {key}: unknown section (expected {', '.join(SECTIONS)})")
    try:
        spec = SimSpec(
            job=_section(JobSettings, raw.get("job"), "job"),
            policy=_section(PolicySettings, raw.get("policy"), "policy"),
            cost_model=CostModel.from_mapping(_mapping(raw.get("cost_model"), "cost_model")),
            simulation=_section(SimulationSettings, raw.get("simulation"), "simulation"),
        )
        fm = raw.get("failure_model", DEFAULT_MODEL)
        if isinstance(fm, Mapping):
            for key in fm:
                if key not in ("model", "causes"):
                    raise SimSpecError(f"failure_model.{key}: unknown field (expected model, causes)")
            spec.failure_model = str(fm.get("model", DEFAULT_MODEL))
            causes = fm.get("causes")
            if causes is not None and (not isinstance(causes, list) or not causes):
                raise SimSpecError("failure_model.causes: expected a list of cause names")
            spec.causes = [str(c) for c in causes] if causes else None
        elif isinstance(fm, str):
            spec.failure_model = fm
        else:
            raise SimSpecError(f"failure_model: expected a model name, a file or a mapping, got {fm!r}")
        spec.check()
        spec.load_model()  # a missing file, a malformed model or an unknown cause: said now, not mid-run
    except (SimSpecError, CostModelError, FailureModelError) as err:
        raise SimSpecError(f"{source}: {err}") from None
    return spec


def load_sim_spec(path: str | Path) -> SimSpec:
    return parse_sim_spec(read_yaml(Path(path), SimSpecError), source=str(path))


def _mapping(raw: Any, where: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SimSpecError(f"{where}: expected a mapping")
    return raw


def _section(cls: type, raw: Any, where: str) -> Any:
    raw = _mapping(raw, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in fields:
            raise SimSpecError(f"{where}.{key}: unknown field (expected {', '.join(fields)})")
        default = getattr(cls(), key)
        if isinstance(default, bool) or (
            isinstance(default, int | float)
            and not (isinstance(value, int | float) and not isinstance(value, bool))
            and not (key == "checkpoint_interval" and value == "auto")
        ):
            raise SimSpecError(f"{where}.{key}: expected a number, got {value!r}")
    return cls(**raw)


def _positive(value: Any, where: str, *, integer: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not value > 0:
        kind = "an integer" if integer else "a number"
        raise SimSpecError(f"{where}: expected {kind} > 0, got {value!r}")
