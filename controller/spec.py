"""The TrainingJob spec: one typed schema (pydantic) for what a user submits, validated with field paths.

It embeds the trainer's own configuration (`trainer.contract.training.TrainingConfig`: model, data, stage and
hyperparameters, parallelism, checkpoints, telemetry) and adds what the control plane owns: resources, the
checkpoint interval policy (`auto`: Young/Daly), fault tolerance with ordered failure rules, the straggler
policy and the backend. The same model becomes the Kubernetes CRD schema, so it stays the single source.
Settings of the decision modules (policy, hangs, stragglers, failures) are built from it, never duplicated.

YAML or JSON files; any problem is one `SpecError` naming the file and the field path.

At submit (`prepare_submission`, used by `vlctl submit` and `vlctl run`) a local-backend spec's relative local
paths are made absolute against the directory it was submitted from, as with any command line tool: the stored
spec then means the same to every controller and rank wherever they run, after a controller restart too, and
`vlctl status` shows the paths that are used. Its inputs are checked to exist and its ranks to fit in memory
there, so a job that cannot start is refused with its field named instead of failing after launches.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from controller.failures import FailureAction, FailureRule
from controller.hangs import HangConfig
from controller.memory import MemoryCheckError, check_memory
from controller.policy import CheckpointIntervalPolicy, RestartPolicy
from controller.quantity import parse_quantity
from controller.stragglers import StragglerConfig
from trainer.contract.training import TrainingConfig

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
BACKENDS = ("local", "kubernetes")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(_Section):
    nodes: int = Field(1, ge=1, description="nodes in the gang (local backend: processes named local-0, ...)")
    procs_per_node: int = Field(1, ge=1, description="training processes per node (one per GPU on GPU nodes)")
    gpus_per_node: int = Field(0, ge=0)
    spare_nodes: int = Field(0, ge=0, description="nodes kept to replace an excluded straggler")
    cpu: str | None = Field(None, description="CPU request per node pod, e.g. '32'")
    memory: str | None = Field(None, description="memory request per node pod, e.g. '512Gi'")

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None:
            parse_quantity(value)  # the API server's grammar, checked here for every backend
        return value

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


class CheckpointPolicy(_Section):
    interval: int | Literal["auto"] = Field(
        "auto", description="steps between checkpoints, or auto: Young/Daly from save time and failure rate"
    )
    min_interval_steps: int = Field(10, ge=1)
    max_interval_steps: int = Field(5000, ge=1)
    expected_failures_per_day: float | None = Field(
        None,
        gt=0,
        description="auto's prior before the job's own failures tell: the failures a day you expect for a job "
        "this size (your fleet's rate per node-day x nodes); unset: one a day",
    )

    @model_validator(mode="after")
    def _bounds(self) -> CheckpointPolicy:
        if self.max_interval_steps < self.min_interval_steps:
            raise ValueError(
                f"max_interval_steps ({self.max_interval_steps}) must be >= min_interval_steps "
                f"({self.min_interval_steps})"
            )
        if isinstance(self.interval, int) and self.interval < 1:
            raise ValueError("interval must be a positive number of steps or 'auto'")
        return self


class FailureRuleSpec(_Section):
    name: str
    action: Literal["retry", "fail", "ignore-for-limit"]
    exit_codes: list[int] = Field(default_factory=list)
    signals: list[int | str] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    message_pattern: str | None = None

    @field_validator("message_pattern")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a regular expression: {err}") from None
        return pattern


def _default_from_context(schema: dict[str, Any]) -> None:
    """A field whose default depends on the rest of the spec (resolved by TrainingJobSpec's validator): no default
    in the JSON schema, so the CRD does not make the API server write one into every TrainingJob."""
    schema.pop("default", None)


def _resolve_default(section: BaseModel, field: str, value: Any) -> None:
    """Give an unset field the default that the rest of the spec decides, still as unset: a TrainingJob rendered
    from the spec (`exclude_unset`) leaves it out, and whoever reads it resolves it the same way."""
    setattr(section, field, value)
    section.model_fields_set.discard(field)


class FaultTolerance(_Section):
    max_restarts: int = Field(
        3, ge=0, description="failures that count toward the limit before the job fails"
    )
    backoff_base_seconds: float = Field(5.0, gt=0)
    backoff_max_seconds: float = Field(300.0, gt=0)
    hang_timeout_seconds: float = Field(
        600.0, gt=0, description="no progress on any rank for this long: hung"
    )
    hang_step_factor: float = Field(
        10.0, gt=0, description="...or for this many median step times, if longer"
    )
    startup_timeout_seconds: float = Field(1800.0, gt=0)
    recovery: Literal["restart", "in-place"] = Field(
        "in-place",
        description="in-place: the survivors stay, hot spares take the lost node's ranks from in-memory snapshots "
        "(falls back to restart when a state is in no memory); restart: a failure stops every rank and the job "
        "resumes from the newest disk checkpoint. Left unset: in-place, except for a one-rank job and a local job "
        "whose snapshots would not fit in memory, which take restart",
        json_schema_extra=_default_from_context,
    )
    hot_spares: int = Field(
        1,
        ge=0,
        description="in-place: spare nodes started with the gang, waiting (torch imported) to replace one. Left "
        "unset: 1 on the local backend, 0 on Kubernetes (a spare pod would hold a whole node's GPUs idle; without "
        "one, a lost pod's replacement is created when it is lost, while the other pods wait in place)",
        json_schema_extra=_default_from_context,
    )
    rules: list[FailureRuleSpec] = Field(default_factory=list, description="ordered; the first match wins")

    def recovery_chosen(self) -> bool:
        """Whether the spec itself says which recovery path (not the default)."""
        return "recovery" in self.model_fields_set


class StragglerPolicy(_Section):
    window: int = Field(20, ge=2, description="steps per evaluation window")
    threshold: float = Field(
        5.0, gt=0, description="robust score above the job median at which a window is slow"
    )
    ratio_threshold: float = Field(1.2, gt=1.0, description="slowdown against the rank's own baseline")
    persistence: int = Field(3, ge=1, description="consecutive slow windows before a rank is flagged")
    warmup_steps: int = Field(20, ge=0)
    action: Literal["report", "exclude-node"] = "report"


class TrainingJobSpec(_Section):
    name: str = Field(description="DNS-1123 label: lowercase letters, digits and '-', at most 63 characters")
    training: TrainingConfig
    resources: Resources = Field(default_factory=Resources)
    checkpoint_policy: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    fault_tolerance: FaultTolerance = Field(default_factory=FaultTolerance)
    stragglers: StragglerPolicy = Field(default_factory=StragglerPolicy)
    backend: Literal["local", "kubernetes"] = "local"

    @field_validator("name")
    @classmethod
    def _dns1123(cls, name: str) -> str:
        if len(name) > 63 or not DNS1123_LABEL.match(name):
            raise ValueError(
                f"{name!r} is not a DNS-1123 label (lowercase letters, digits and '-', starting and "
                "ending with a letter or digit, at most 63 characters)"
            )
        return name

    @model_validator(mode="after")
    def _gang(self) -> TrainingJobSpec:
        p, r = self.training.parallel, self.resources
        if p.world_size != r.world_size:
            raise ValueError(
                f"training.parallel: dp x tp x pp = {p.dp} x {p.tp} x {p.pp} = {p.world_size} must "
                f"equal resources.nodes x resources.procs_per_node = {r.nodes} x {r.procs_per_node} "
                f"= {r.world_size}"
            )
        f = self.fault_tolerance
        if f.recovery == "in-place" and p.world_size < 2:
            if f.recovery_chosen():
                raise ValueError(
                    "fault_tolerance.recovery: in-place needs at least 2 ranks (a snapshot's replica is kept by a "
                    "peer); use restart"
                )
            _resolve_default(f, "recovery", "restart")  # the default where it cannot apply
        if self.backend == "kubernetes" and "hot_spares" not in f.model_fields_set:
            _resolve_default(f, "hot_spares", 0)
        if p.tp > r.procs_per_node and r.procs_per_node > 0:
            raise ValueError(
                f"training.parallel.tp ({p.tp}) must fit in one node "
                f"(resources.procs_per_node = {r.procs_per_node})"
            )
        return self

    # ---------------------------------------------------------------- settings of the decision modules

    def restart_policy(self) -> RestartPolicy:
        f = self.fault_tolerance
        return RestartPolicy(
            max_restarts=f.max_restarts,
            backoff_base_seconds=f.backoff_base_seconds,
            backoff_max_seconds=f.backoff_max_seconds,
        )

    def hang_config(self) -> HangConfig:
        f = self.fault_tolerance
        return HangConfig(
            hang_timeout_seconds=f.hang_timeout_seconds,
            step_time_factor=f.hang_step_factor,
            startup_timeout_seconds=f.startup_timeout_seconds,
        )

    def straggler_config(self) -> StragglerConfig:
        s = self.stragglers
        return StragglerConfig(
            window=s.window,
            threshold=s.threshold,
            ratio_threshold=s.ratio_threshold,
            persistence=s.persistence,
            warmup_steps=s.warmup_steps,
        )

    def checkpoint_interval_policy(self) -> CheckpointIntervalPolicy:
        c = self.checkpoint_policy
        prior = (
            {}
            if c.expected_failures_per_day is None
            else {"prior_mtbf_seconds": 86400.0 / c.expected_failures_per_day}
        )
        return CheckpointIntervalPolicy(
            min_interval_steps=c.min_interval_steps, max_interval_steps=c.max_interval_steps, **prior
        )

    def failure_rules(self) -> list[FailureRule]:
        return [
            FailureRule(
                name=r.name,
                action=FailureAction(r.action),
                exit_codes=tuple(r.exit_codes),
                signals=tuple(r.signals),
                reasons=tuple(r.reasons),
                message_pattern=r.message_pattern,
            )
            for r in self.fault_tolerance.rules
        ]


class SpecError(ValueError):
    """An invalid TrainingJob spec; the message is one line naming the file and the field path."""


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where + ': ' if where else ''}{message}{more}"


def parse_spec(raw: Any, *, source: str = "spec") -> TrainingJobSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level")
    try:
        return TrainingJobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(_one_line(err, source)) from None


def load_spec(path: str | Path) -> TrainingJobSpec:
    """Read a YAML or JSON spec file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"{path}: cannot read ({err.strerror})") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise SpecError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {str(err).splitlines()[0]}"
        ) from None
    return parse_spec(raw, source=str(path))


# ------------------------------------------------------------------------------------------ at submit


def _is_url(path: str) -> bool:
    return "://" in path


def _absolute(path: str, base: Path) -> str:
    """`path` against `base` (after `~`), normalised but with symlinks kept, as the user wrote them."""
    return os.path.normpath(Path(base, os.path.expanduser(path)))


def _has_content(path: Path) -> bool:
    """True when the file holds something besides whitespace (read until the first such byte)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return True
    return False


def resolve_paths(spec: TrainingJobSpec, base_dir: str | Path) -> TrainingJobSpec:
    """A copy of a local-backend spec whose relative local paths are absolute, taken against `base_dir` (the
    directory the job was submitted from), so they mean the same to every controller and rank, after a restart
    too, and the stored spec shows them as they will be used. Object-storage URLs, the checkpoint folder (it is
    relative to the run folder by design) and a run_dir the spec leaves at its default (the controller puts
    that under its runs root) stay as they are. Kubernetes specs are returned unchanged: their paths are the
    pods'."""
    if spec.backend != "local":
        return spec
    base = Path(base_dir).absolute()
    spec = spec.model_copy(deep=True)
    t, data = spec.training, spec.training.data
    data.paths = [p if _is_url(p) else _absolute(p, base) for p in data.paths]
    data.corpora = [p if _is_url(p) else _absolute(p, base) for p in data.corpora]
    if data.tokenizer is not None and not _is_url(data.tokenizer):
        data.tokenizer = _absolute(data.tokenizer, base)
    if not _is_url(data.cache_dir):
        data.cache_dir = _absolute(data.cache_dir, base)
    if not t.model.is_preset and not _is_url(t.model.name):
        t.model.name = _absolute(t.model.name, base)
    if "run_dir" in t.model_fields_set and not _is_url(t.run_dir):
        t.run_dir = _absolute(t.run_dir, base)
    return spec


def check_paths(spec: TrainingJobSpec) -> None:
    """Raise SpecError (naming the field and the path looked at) for a local input the job could not read:
    a missing or empty sample file, a corpus without its index, a missing tokenizer or checkpoint folder.
    Local-backend specs only; URLs are not looked up."""
    if spec.backend != "local":
        return
    t = spec.training
    for i, path in enumerate(t.data.paths):
        if _is_url(path):
            continue
        where, file = f"training.data.paths[{i}]", Path(path)
        if not file.exists():
            raise SpecError(f"{where}: sample file not found: {path}")
        if not file.is_file():
            raise SpecError(f"{where}: not a file: {path}")
        try:
            if not _has_content(file):
                raise SpecError(f"{where}: sample file is empty: {path}")
        except OSError as err:
            raise SpecError(f"{where}: cannot read {path} ({err.strerror})") from None
    for i, prefix in enumerate(t.data.corpora):
        if not _is_url(prefix) and not Path(prefix + ".idx").is_file():
            raise SpecError(f"training.data.corpora[{i}]: corpus index not found: {prefix}.idx")
    if t.data.tokenizer is not None and not _is_url(t.data.tokenizer) and not Path(t.data.tokenizer).is_dir():
        raise SpecError(f"training.data.tokenizer: not a directory: {t.data.tokenizer}")
    if not t.model.is_preset and not _is_url(t.model.name) and not Path(t.model.name).is_dir():
        raise SpecError(f"training.model.name: checkpoint directory not found: {t.model.name}")


def prepare_submission(
    spec: TrainingJobSpec,
    *,
    base_dir: str | Path,
    source: str = "spec",
    notice: Callable[[str], None] | None = None,
) -> TrainingJobSpec:
    """What `vlctl submit` and `vlctl run` store: the spec with its local paths made absolute against `base_dir`
    (see resolve_paths), after checking that its local inputs are there and that its ranks fit in memory
    (controller.memory). Any problem is one SpecError naming `source` and the field. A job left on the default
    in-place recovery whose snapshots alone would not fit takes the restart path instead, said to `notice`."""
    resolved = resolve_paths(spec, base_dir)
    try:
        check_paths(resolved)
        try:
            check_memory(resolved)
        except MemoryCheckError as err:
            f = resolved.fault_tolerance
            if f.recovery != "in-place" or f.recovery_chosen():
                raise
            f.recovery = "restart"
            check_memory(resolved)  # still too big: that error, not the snapshots'
            if notice is not None:
                notice(
                    f"{source}: fault_tolerance.recovery: restart (in-place snapshots would not fit: {err})"
                )
    except (SpecError, MemoryCheckError) as err:
        raise SpecError(f"{source}: {err}") from None
    return resolved
