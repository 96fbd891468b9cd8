"""An attempt's objects for the Kubernetes backend: `k8s.render` behind the backend's `AttemptManifests`.

The backend lives in the controller layer, which never imports `k8s`, so the operator hands it this renderer.
The attempt's configuration is the one the controller wrote (checkpoint interval, verified resume step); it goes
into the ConfigMap with the pod-side fields in place of the controller's own, and the resume point onto the
pods' command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from controller.backends.kubernetes import AttemptRequest
from controller.spec import TrainingJobSpec
from k8s import render
from k8s.crd import API_VERSION, KIND


class RenderedAttempts:
    """`AttemptManifests` for the backend: `k8s.render`, with the controller's configuration in the ConfigMap."""

    label_job = render.LABEL_JOB
    label_attempt = render.LABEL_ATTEMPT
    label_node_index = render.LABEL_NODE_INDEX

    def render(self, request: AttemptRequest) -> list[dict[str, Any]]:
        binding = request.binding
        objects = render.render_job(
            binding.spec,
            namespace=binding.namespace,
            attempt=request.attempt,
            resume_from=resume_point(request.config),
            excluded_nodes=request.excluded_nodes,
            image=request.image,
            owner=binding.owner,
            gang=request.gang,
            queue=request.queue,
            env_secrets=binding.env_secrets,
        )
        text = yaml.safe_dump(pod_config(request.config, binding.spec), sort_keys=False)
        objects[0]["data"][render.CONFIG_FILE] = text
        return objects

    def metrics_base_port(self, spec: TrainingJobSpec) -> int:
        return render.metrics_base_port(spec)


def pod_config(controller_config: Mapping[str, Any], spec: TrainingJobSpec) -> dict[str, Any]:
    """The controller's attempt configuration (checkpoint interval, resume step) with the fields the pods need in
    place of the controller's own: its run folder is on the operator's disk, its telemetry on loopback."""
    pod_side = render.trainer_config(spec)
    config = dict(controller_config)
    for key in ("run_dir", "job_name", "telemetry"):
        config[key] = pod_side[key]
    return config


def resume_point(config: Mapping[str, Any]) -> tuple[int, str] | None:
    """(step, checkpoint root) an attempt resumes from, from the controller's configuration of it."""
    checkpoint = config.get("checkpoint") or {}
    step = checkpoint.get("resume_step")
    if checkpoint.get("resume") == "none" or step is None:
        return None
    return int(step), str(checkpoint["dir"])


def owner_of(obj: Mapping[str, Any]) -> dict[str, str]:
    """The owner reference to a TrainingJob that every object of its attempts carries."""
    meta = obj["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"]}
