"""The options commands share, and the one rule that says where a job command goes (the store or a cluster).

Kept free of the store, the Kubernetes client and pydantic: every command module imports it at start-up, and
`vlctl --help` should not pay for what only running a command needs.

Where a command goes: `--backend kubernetes|local` when given; else `--context NAME` means the cluster; else the
environment variable VLCTL_BACKEND (`kubernetes` or `local`); else the controller's store (VLCTL_DATABASE_URL).
A spec's own `backend:` field never chooses.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

import typer

from .errors import EXIT_USER_ERROR, CliError
from .output import OutputFormat

ENV_BACKEND = "VLCTL_BACKEND"
DEFAULT_IMAGE = "vlctl/trainer:0.1.0"  # the operator Deployment's VLCTL_TRAINER_IMAGE
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

OutputOption = Annotated[
    OutputFormat, typer.Option("--output", "-o", help="table for people, json for scripts")
]
JobArgument = Annotated[str, typer.Argument(help="the job's name")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]


class BackendChoice(StrEnum):
    local = "local"
    kubernetes = "kubernetes"


_WHERE = "default: --context's cluster, else VLCTL_BACKEND, else local"
BackendOption = Annotated[
    BackendChoice | None,
    typer.Option(help=f"local: the controller's store; kubernetes: the kubeconfig's cluster ({_WHERE})"),
]
ContextOption = Annotated[
    str | None,
    typer.Option("--context", help="this kubeconfig context's cluster (implies --backend kubernetes)"),
]
_NS_HELP = "the cluster's namespace (default: the context's, else 'default')"
NamespaceOption = Annotated[str | None, typer.Option("--namespace", "-n", help=_NS_HELP)]
NamespaceLongOption = Annotated[str | None, typer.Option("--namespace", help=_NS_HELP)]  # logs: -n is --lines


@dataclass(frozen=True, slots=True)
class Target:
    """A command bound for the cluster: the context (None: the current one) and the namespace asked for."""

    context: str | None
    namespace: str | None


def target(backend: BackendChoice | None, context: str | None, namespace: str | None) -> Target | None:
    """The cluster the command goes to, or None for the store (the rule in the module docstring)."""
    if backend is None and context is None:
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env and env not in tuple(BackendChoice):
            raise CliError(f"{ENV_BACKEND}: expected local or kubernetes, got {env!r}")
        backend = BackendChoice(env) if env else None
    if backend is BackendChoice.local and context is not None:
        raise CliError("--context: names a Kubernetes context, not for --backend local")
    if backend is BackendChoice.kubernetes or context is not None:
        if namespace is not None and not _DNS1123_LABEL.match(namespace):
            raise CliError(f"--namespace: {namespace!r} is not a valid namespace name (a DNS-1123 label)")
        return Target(context=context, namespace=namespace)
    if namespace is not None:
        raise CliError(
            "--namespace: only for a cluster: add --backend kubernetes or --context (or set VLCTL_BACKEND)"
        )
    return None


def confirm(command: str, question: str, yes: bool) -> None:
    """Ask before a destructive change; without a terminal, only `--yes` may go ahead."""
    if yes:
        return
    if not typer.get_text_stream("stdin").isatty():
        raise CliError(f"{command}: pass --yes when not running interactively", EXIT_USER_ERROR)
    typer.confirm(question, abort=True)
