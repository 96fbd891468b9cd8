"""The trainer as a torchx component: the AppDef, what torchx's local_cwd and kubernetes schedulers would submit
for it (in process and through the real `torchx` CLI), the shell command as bash runs it, and (slow) a real
2-step training through torchx's local_cwd scheduler."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes.client import ApiClient
from torchx import specs
from torchx.runner import get_runner
from torchx.specs.file_linter import validate as lint_component
from torchx.specs.finder import ModuleComponentsFinder
from train_harness import make_data, write_config

from trainer import torchx_component
from trainer.torchx_component import train

REPO = Path(__file__).resolve().parents[2]
COMPONENT = "./trainer/torchx_component.py:train"
TORCHX = Path(sys.executable).parent / "torchx"
K8S_VERSION = "1.30.0"
IMAGE = "registry.example.com/vlctl/trainer:0.1.0"
IN_IMAGE_CONFIG = "/etc/vlctl/not-on-this-machine/train.yaml"  # only the trainer in the pod can check it
REQUEST_MARK = "=== SCHEDULER REQUEST ==="


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A valid training config for 4 processes (data paths are read by the trainer only, not checked here)."""
    path = write_config(tmp_path / "train.yaml", ["data/a.jsonl"], tmp_path / "run", parallel={"dp": 4})
    return path


def k8s_request(app: specs.AppDef, **cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Volcano Job torchx would create, as JSON-ready dicts; the resolved scheduler config)."""
    with get_runner() as runner:
        info = runner.dryrun(app, "kubernetes", cfg={"queue": "default", **cfg})
    return ApiClient().sanitize_for_serialization(info.request.resource), dict(info._cfg)


def container_of(task: dict[str, Any]) -> dict[str, Any]:
    (container,) = task["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


# ---------------------------------------------------------------------------------------------- the AppDef


def test_one_node_runs_torchrun_standalone_with_the_trainer_and_its_telemetry(config: Path) -> None:
    app = train(str(config), "training.steps=2", nproc_per_node=4, image=IMAGE, cpu=16, memMB=65536)
    (role,) = app.roles
    assert (app.name, role.name, role.num_replicas, role.image) == ("vlctl-train", "trainer", 1, IMAGE)
    assert [role.entrypoint, *role.args] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=4",
        "--max-restarts=0",
        "-m",
        "trainer.train",
        str(config),
        "job_name=${app_id}",
        "telemetry.host=0.0.0.0",
        "telemetry.base_port=9500",
        "training.steps=2",
    ]
    assert role.env == {
        "VLCTL_TRAINING_JOB": "${app_id}",
        "VLCTL_METRICS_HOST": "0.0.0.0",
        "VLCTL_METRICS_BASE_PORT": "9500",
        "PYTHONUNBUFFERED": "1",
        "DS_ACCELERATOR": "cpu",
    }
    assert role.port_map == {f"metrics-{r}": 9500 + r for r in range(4)}
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (16, 0, 65536)


def test_user_env_and_overrides_win_and_gpu_nodes_keep_deepspeed_on_cuda(config: Path) -> None:
    app = train(
        str(config),
        "telemetry.host=127.0.0.1",
        nproc_per_node=4,
        gpus_per_node=8,
        env={"VLCTL_METRICS_HOST": "127.0.0.1", "NCCL_DEBUG": "INFO"},
        max_retries=3,
        metrics_port=0,
    )
    (role,) = app.roles
    # The trainer applies overrides in order: the user's, after the component's, decide.
    assert role.args[-2:] == ["telemetry.host=0.0.0.0", "telemetry.host=127.0.0.1"]
    assert not any(a.startswith("telemetry.base_port=") for a in role.args)
    assert role.env["VLCTL_METRICS_HOST"] == "127.0.0.1" and role.env["NCCL_DEBUG"] == "INFO"
    assert "DS_ACCELERATOR" not in role.env and "VLCTL_METRICS_BASE_PORT" not in role.env
    assert role.port_map == {} and role.max_retries == 3 and role.resource.gpu == 8


def _run_with_fake_python(args: list[str], tmp_path: Path, **env: str) -> list[str]:
    """Run the role's `bash -c` line as a node would, with a `python` that prints the argv it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "python"
    fake.write_text(
        f'#!/bin/sh\nexec {sys.executable} -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"\n'
    )
    fake.chmod(0o755)
    out = subprocess.run(
        ["bash", *args],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_several_nodes_rendezvous_statically_at_the_rank0_host_and_overrides_stay_data(
    tmp_path: Path,
) -> None:
    hostile = 'data.paths=["$(touch pwned)", "`touch pwned`", "a b.jsonl; touch pwned"]'
    app = train(IN_IMAGE_CONFIG, hostile, "checkpoint.dir=s3://ckpt/${app_id}", nnodes=2, nproc_per_node=2)
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.num_replicas == 2
    assert role.port_map == {"rendezvous": 29500, "metrics-0": 9500, "metrics-1": 9501}
    # What a scheduler does per replica: substitute torchx's macros, then bash expands the rank-0 host variable.
    replica1 = specs.macros.Values(
        img_root="", app_id="app-7", replica_id="1", rank0_env="VC_TRAINER_0_HOSTS"
    )
    argv = _run_with_fake_python(
        replica1.apply(role).args, tmp_path, VC_TRAINER_0_HOSTS="app-7-trainer-0.app-7"
    )
    assert argv == [
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--node-rank=1",
        "--nproc-per-node=2",
        "--rdzv-backend=static",
        "--master-addr=app-7-trainer-0.app-7",
        "--master-port=29500",
        "--max-restarts=0",
        "-m",
        "trainer.train",
        IN_IMAGE_CONFIG,
        "job_name=app-7",
        "telemetry.host=0.0.0.0",
        "telemetry.base_port=9500",
        hostile,
        "checkpoint.dir=s3://ckpt/app-7",
    ]
    assert not (tmp_path / "pwned").exists()
    # Replica 0 of a scheduler that leaves the variable unset is the host itself.
    replica0 = specs.macros.Values(img_root="", app_id="app-7", replica_id="0", rank0_env="TORCHX_RANK0_HOST")
    argv = _run_with_fake_python(replica0.apply(role).args, tmp_path)
    assert "--node-rank=0" in argv and "--master-addr=localhost" in argv


@pytest.mark.parametrize(
    ("kwargs", "overrides", "message"),
    [
        ({"nnodes": 0}, (), "nnodes: must be >= 1"),
        ({"nproc_per_node": 4, "gpus_per_node": 2}, (), "nproc_per_node: 4 processes would share 2 GPUs"),
        ({}, ("training.steps",), "override 'training.steps': expected key.path=value"),
        ({"nproc_per_node": 2}, (), "parallel dp x tp x pp = 4 x 1 x 1 = 4, but nnodes x nproc_per_node = 2"),
        ({}, ("training.steps=zero",), "train.yaml: training.steps: Input should be a valid integer"),
        ({"nnodes": 2, "nproc_per_node": 2, "metrics_port": 29499}, (), "overlap rdzv_port 29500"),
        ({"nproc_per_node": 4, "metrics_port": 65534}, (), "metrics_port: ports 65534..65537"),
    ],
    ids=[
        "no-nodes",
        "gpu-sharing",
        "bad-override",
        "world-size",
        "invalid-config",
        "port-overlap",
        "port-range",
    ],
)
def test_bad_arguments_fail_at_submission_with_one_line(config: Path, kwargs, overrides, message) -> None:
    kwargs = {"nproc_per_node": 4, **kwargs}
    with pytest.raises(ValueError) as err:
        train(str(config), *overrides, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_torchx_accepts_the_component_by_path_and_as_an_entry_point_module() -> None:
    assert lint_component(torchx_component.__file__, "train") == []
    # What a `[project.entry-points."torchx.components"] vlctl = "trainer.torchx_component"` line makes torchx do.
    found = {c.name: c for c in ModuleComponentsFinder("trainer.torchx_component", "vlctl").find()}
    assert found["vlctl.train"].validation_errors == []


# -------------------------------------------------------------------------------- scheduler requests, in process


def test_local_cwd_request_runs_one_agent_per_node_with_the_app_id_as_job_label(
    config: Path, tmp_path
) -> None:
    app = train(str(config), nnodes=2, nproc_per_node=2, metrics_port=0)
    with get_runner() as runner:
        request = runner.dryrun(app, "local_cwd", cfg={"log_dir": str(tmp_path / "logs")}).request
    replicas = request.role_params["trainer"]
    assert len(replicas) == 2
    for node, replica in enumerate(replicas):
        assert replica.args[:2] == ["bash", "-c"]
        line = replica.args[2]
        assert f"'--node-rank={node}'" in line and "--master-addr=${TORCHX_RANK0_HOST:=localhost}" in line
        assert f"'job_name={request.app_id}'" in line
        assert replica.env["VLCTL_TRAINING_JOB"] == request.app_id
        assert replica.env["TORCHX_RANK0_HOST"] == "localhost"
        assert replica.cwd == os.getcwd()


# torchx warns that Volcano's own retries are unreliable whenever max_retries > 0: a note for users, expected here.
@pytest.mark.filterwarnings("ignore::UserWarning:torchx.schedulers.kubernetes_scheduler")
def test_kubernetes_request_is_a_volcano_job_of_valid_pods(config: Path) -> None:
    app = train(
        str(config),
        "training.steps=2",
        nnodes=2,
        nproc_per_node=2,
        gpus_per_node=2,
        cpu=32,
        memMB=262144,
        image=IMAGE,
        mounts=["type=volume", "src=datasets", "dst=/data", "readonly"],
        max_retries=2,
    )
    job, cfg = k8s_request(app, namespace="ml-research")
    assert cfg["namespace"] == "ml-research"
    assert (job["apiVersion"], job["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    assert job["spec"]["queue"] == "default" and job["spec"]["schedulerName"] == "volcano"
    assert job["spec"]["maxRetry"] == 2
    tasks = job["spec"]["tasks"]
    assert [t["name"] for t in tasks] == ["trainer-0", "trainer-1"] and all(t["replicas"] == 1 for t in tasks)
    app_id = job["metadata"]["name"]
    for node, task in enumerate(tasks):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", **task["template"]}, K8S_VERSION, strict=True
        )
        container = container_of(task)
        assert container["image"] == IMAGE
        head, line = container["command"][:2], container["command"][2]
        assert head == ["bash", "-c"] and line.startswith("exec python -m torch.distributed.run --nnodes=2 ")
        assert f"'--node-rank={node}'" in line and "--nproc-per-node=2" in line
        # Replica 0 is the rendezvous host; the others find it through the variable Volcano's svc plugin sets.
        rank0 = "TORCHX_RANK0_HOST" if node == 0 else "VC_TRAINER_0_HOSTS"
        assert f"--master-addr=${{{rank0}:=localhost}}" in line
        assert line.endswith(
            f" -m trainer.train {config} 'job_name={app_id}' telemetry.host=0.0.0.0 "
            "telemetry.base_port=9500 training.steps=2"
        )
        env = env_of(container)
        assert env["VLCTL_TRAINING_JOB"] == app_id and env["VLCTL_METRICS_BASE_PORT"] == "9500"
        assert "DS_ACCELERATOR" not in env
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "2"
        assert resources["limits"]["cpu"] == "32000m" and resources["limits"]["memory"] == "262144M"
        assert {(p["name"], p["containerPort"]) for p in container["ports"]} == {
            ("rendezvous", 29500),
            ("metrics-0", 9500),
            ("metrics-1", 9501),
        }
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert set(mounts) == {"/dev/shm", "/data"} and mounts["/data"]["readOnly"] is True
        volumes = {v["name"]: v for v in task["template"]["spec"]["volumes"]}
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory"}
        assert volumes[mounts["/data"]["name"]]["persistentVolumeClaim"] == {"claimName": "datasets"}
        assert task["template"]["spec"]["restartPolicy"] == "Never"


# ------------------------------------------------------------------------------------------ the real torchx CLI


def torchx_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TORCHX), "run", "--dryrun", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def scheduler_request(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    assert REQUEST_MARK in result.stdout, result.stdout
    return result.stdout.split(REQUEST_MARK, 1)[1]


def test_cli_dryrun_local_cwd(config: Path, tmp_path: Path) -> None:
    args = ["-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}", COMPONENT, "--config", str(config)]
    args += ["--nproc_per_node", "4", "--env", "OMP_NUM_THREADS=1", "training.steps=2"]
    request = ast.literal_eval(scheduler_request(torchx_cli(*args)))
    (replica,) = request["role_params"]["trainer"]
    assert replica["args"][:5] == ["python", "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    assert replica["args"][-4:] == [
        f"job_name={request['app_id']}",
        "telemetry.host=0.0.0.0",
        "telemetry.base_port=9500",
        "training.steps=2",
    ]
    assert (
        replica["env"]["OMP_NUM_THREADS"] == "1" and replica["env"]["VLCTL_TRAINING_JOB"] == request["app_id"]
    )
    assert replica["cwd"] == str(REPO)


def test_cli_dryrun_kubernetes_needs_no_cluster_with_the_workspace_off() -> None:
    # `--workspace ""`: torchx would otherwise build an image of the current folder with Docker first.
    args = ["-s", "kubernetes", "-cfg", "queue=research,namespace=ml", "--workspace", "", COMPONENT]
    args += ["--config", IN_IMAGE_CONFIG, "--nnodes", "3", "--nproc_per_node", "8", "--gpus_per_node", "8"]
    args += ["--image", IMAGE, "parallel.dp=24"]
    job = yaml.safe_load(scheduler_request(torchx_cli(*args)))
    assert job["kind"] == "Job" and job["spec"]["queue"] == "research"
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 3
    for node, task in enumerate(tasks):
        container = container_of(task)
        assert container["image"] == IMAGE
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert f"'--node-rank={node}'" in container["command"][2]
        assert container["command"][2].endswith(
            f"{IN_IMAGE_CONFIG} 'job_name={job['metadata']['name']}' "
            "telemetry.host=0.0.0.0 telemetry.base_port=9500 parallel.dp=24"
        )
        assert len([p for p in container["ports"] if p["name"].startswith("metrics-")]) == 8


def test_cli_rejects_a_config_that_does_not_fit_the_gang(config: Path) -> None:
    result = torchx_cli("-s", "local_cwd", COMPONENT, "--config", str(config), "--nproc_per_node", "2")
    assert result.returncode != 0
    assert "parallel dp x tp x pp = 4 x 1 x 1 = 4, but nnodes x nproc_per_node = 2" in result.stderr


# ------------------------------------------------------------------------------------------ a real local run


@pytest.mark.slow
def test_local_cwd_trains_two_steps_through_torchx(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "train.yaml",
        data,
        run_dir,
        training={"steps": 2, "warmup_steps": 1},
        checkpoint={"interval_steps": 2, "async_save": False},
    )
    app = train(
        str(config),
        name="tiny",
        metrics_port=0,  # any free port: never collides with another test's
        metrics_host="127.0.0.1",
        # `python` must be this interpreter: the scheduler runs the entrypoint from PATH.
        env={"PATH": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1"},
    )
    with get_runner() as runner:
        handle = runner.run(app, "local_cwd", cfg={"log_dir": str(tmp_path / "logs")})
        status = runner.wait(handle, wait_interval=0.5)
    logs = "\n".join(p.read_text() for p in (tmp_path / "logs").rglob("*.log"))
    assert status is not None and status.state == specs.AppState.SUCCEEDED, logs
    app_id = handle.rsplit("/", 1)[1]
    steps = [json.loads(line) for line in (run_dir / "metrics-rank0.jsonl").read_text().splitlines()]
    assert len([s for s in steps if "loss" in s]) == 2
    endpoint = json.loads((run_dir / "metrics-rank0.endpoint.json").read_text())
    assert endpoint["host"] == "127.0.0.1"  # the component's override reached the trainer
    assert (run_dir / "checkpoints" / "step-00000002").is_dir() and app_id.startswith("tiny-")
