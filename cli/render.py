"""`vlctl render FILE`: the Kubernetes objects the operator would create for one attempt of a job, for review.

Decisions:

- FILE is a TrainingJob object (as in k8s/examples, or `kubectl get tj NAME -o yaml`) or a plain job spec
  (as `vlctl submit` takes); `-` reads standard input. The output starts with the TrainingJob object (the given
  one, or the one `kubectl apply` would need for a plain spec), then the attempt's ConfigMap, Service, PodGroup
  (gang volcano) and Pods: a YAML stream, or a JSON list with `--output json`.
- Rendering goes through the operator's own checks (`k8s.render.render_job`): a spec the operator would reject
  fails here with the same one-line reason, exit code 2.
- What the operator decides at run time is left out: owner references need the TrainingJob's uid (rendered only
  when FILE carries one, as a `kubectl get` output does: a made-up uid would get the objects garbage-collected if
  applied), excluded nodes come from straggler reports, and the ConfigMap holds the spec's training
  configuration, where the operator writes the controller's configuration of the attempt (the checkpoint
  interval in effect, the checkpoint to resume from).
- The defaults match the operator's Deployment (k8s/base/deployment.yaml): image from VLCTL_TRAINER_IMAGE, gang
  from VLCTL_GANG_SCHEDULER, queue from VLCTL_GANG_QUEUE.
"""

from __future__ import annotations

import json
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from .errors import EXIT_USER_ERROR, CliError
from .options import DEFAULT_IMAGE

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class RenderFormat(StrEnum):
    yaml = "yaml"
    json = "json"


class GangChoice(StrEnum):
    none = "none"
    volcano = "volcano"
    kueue = "kueue"


def render(
    file: Annotated[
        Path, typer.Argument(help="a TrainingJob object or a job spec (YAML or JSON); - reads stdin")
    ],
    namespace: Annotated[
        str | None,
        typer.Option("--namespace", "-n", help="default: the object's namespace, else 'default'"),
    ] = None,
    attempt: Annotated[int, typer.Option(help="the attempt to render (1: the first launch)")] = 1,
    image: Annotated[
        str, typer.Option(envvar="VLCTL_TRAINER_IMAGE", help="the trainer image every pod runs")
    ] = DEFAULT_IMAGE,
    gang: Annotated[
        GangChoice, typer.Option(envvar="VLCTL_GANG_SCHEDULER", help="gang admission, as the operator's")
    ] = GangChoice.none,
    queue: Annotated[
        str | None, typer.Option(envvar="VLCTL_GANG_QUEUE", help="the Volcano queue or Kueue LocalQueue")
    ] = None,
    output: Annotated[
        RenderFormat, typer.Option("--output", "-o", help="a YAML stream, or a JSON list")
    ] = RenderFormat.yaml,
) -> None:
    """Print the objects the operator would create for a job's attempt: the TrainingJob, then its ConfigMap,
    Service, PodGroup (gang volcano) and Pods. Owner references appear only for an object that has a uid; the
    operator puts the controller's attempt configuration (checkpoint interval, resume step) in the ConfigMap."""
    import yaml

    from controller.spec import SpecError

    from .manifests import render_objects

    _check_options(namespace=namespace, attempt=attempt, image=image, gang=gang, queue=queue)
    try:
        objects = render_objects(
            file, namespace=namespace, attempt=attempt, image=image, gang=gang.value, queue=queue
        )
    except (SpecError, ValueError) as err:
        raise CliError(str(err), EXIT_USER_ERROR) from None
    if output is RenderFormat.json:
        print(json.dumps(objects, indent=2))
    else:
        sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, explicit_start=True, width=110))


def _check_options(
    *, namespace: str | None, attempt: int, image: str, gang: GangChoice, queue: str | None
) -> None:
    if namespace is not None and not _DNS1123_LABEL.match(namespace):
        raise CliError(f"--namespace: {namespace!r} is not a valid namespace name (a DNS-1123 label)")
    if attempt < 1:
        raise CliError(f"--attempt: must be >= 1, got {attempt}")
    if not image.strip():
        raise CliError("--image: must name the trainer image")
    if gang is GangChoice.kueue and not queue:
        raise CliError("--queue: gang kueue needs the name of a Kueue LocalQueue")
    if gang is GangChoice.none and queue:
        raise CliError(f"--queue: {queue!r} is only used with --gang volcano or kueue")


def register(app: typer.Typer) -> None:
    app.command()(render)
