"""The interface of the job commands' two backends: the controller's store (cli/store_jobs.py) and a
Kubernetes cluster's TrainingJobs (cli/cluster.py). cli/jobs.py's `jobs_client` chooses one by the rule of
cli/options.py, so each command is written once and renders the same `JobView` either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .output import OutputFormat

if TYPE_CHECKING:
    from controller.views import JobView


@dataclass(frozen=True, slots=True)
class Answer:
    """What a changing command returns: its JSON document and the line a person reads instead."""

    data: Any
    text: str


@dataclass(frozen=True, slots=True)
class LogRequest:
    """Which log lines `vlctl logs` wants: one rank's or node's (else all), which attempt (else the current),
    how many last lines, and whether to follow until the job ends."""

    rank: int | None
    node: str | None
    attempt: int | None
    follow: bool
    lines: int
    output: OutputFormat


class JobsClient(Protocol):
    def submit(self, file: Path) -> Answer: ...

    def list_jobs(self) -> list[JobView]: ...

    def status(self, name: str) -> JobView: ...

    def events(self, name: str) -> list[dict[str, Any]]: ...

    def cancel(self, name: str, yes: bool) -> Answer: ...

    def logs(self, name: str, request: LogRequest) -> None: ...
