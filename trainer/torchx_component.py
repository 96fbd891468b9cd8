"""The trainer as a torchx component: `torchx run -s local_cwd|kubernetes ... trainer/torchx_component.py:train`.

For torchx users who want torchx's schedulers rather than vlctl's controller: the AppDef runs the same command
the vlctl operator runs in its pods (`python -m torch.distributed.run ... -m trainer.train CONFIG OVERRIDES`),
with the same telemetry, so dashboards and alerts work on either.

    torchx run -s local_cwd trainer/torchx_component.py:train --config examples/train.yaml training.steps=20
    torchx run -s kubernetes -cfg queue=default,namespace=ml --workspace "" trainer/torchx_component.py:train \\
        --config /data/train.yaml --nnodes 2 --nproc_per_node 8 --gpus_per_node 8 parallel.dp=16

Options come before the overrides (torchx hands everything from the first override on to the trainer). local_cwd
runs `python` from PATH: run torchx from the activated virtualenv. On kubernetes, `--workspace ""` submits the
image as it is; without it torchx first builds an image of the current folder with Docker. `--dryrun` prints
the Volcano Job without a cluster.

Decisions:

- One role, `trainer`, one replica per node, each a torchrun agent with `--max-restarts=0`: a failed rank
  fails the gang and the scheduler's retries (`max_retries`) start it again, resuming from the newest checkpoint
  (the trainer's default), as under the vlctl controller.
- One node: `--standalone` (torchrun picks a free port, so several local runs never collide). Several nodes:
  static rendezvous at replica 0's host (torchx's `rank0_env` macro names the variable that holds it, so the
  command goes through `bash -c`, with `exec` so SIGTERM reaches torchrun and the trainer saves before a
  preemption), node rank = torchx replica id. As on the operator, node i then always holds global ranks
  i*P .. i*P+P-1, so a straggler maps to its node; c10d would assign node ranks in join order.
- Telemetry: the trainer's config file wins over the VLCTL_METRICS_* environment, so the listen address and base
  port are also passed as overrides (before the user's, which win). Each local rank serves on base + local rank,
  declared as ports `metrics-<local rank>` (scrape targets on Kubernetes). `metrics_port=0` lets every rank pick
  a free port instead (several nodes on one host, e.g. local_cwd with nnodes > 1), reported in the run folder's
  endpoint files. The `training_job` label is torchx's app id.
- Overrides may use torchx's macros (`checkpoint.dir=s3://bucket/${app_id}`): torchx substitutes them in every
  argument. Each override is shell-quoted when the command goes through bash.
- When CONFIG is a readable local file (always so on local_cwd), the configuration is validated here, with the
  overrides, and its dp x tp x pp checked against nnodes x nproc_per_node: a mismatch fails at submission with
  one line rather than on every rank after scheduling. A path that exists only in the image is not checked.

Torchx reads the signature: arguments are typed with `typing.Optional/Dict/List` (its component linter accepts
no other spelling), and this file has no `from __future__ import annotations` (torchx builds its argument
parser from the evaluated annotations). It also `exec`s this file when it is named by path, so it imports only
absolute names.
"""

import shlex
from pathlib import Path
from typing import Dict, List, Optional  # noqa: UP035 - the torchx linter accepts only these names

import torchx.specs as specs

from trainer.contract.telemetry import (
    ENV_METRICS_BASE_PORT,
    ENV_METRICS_HOST,
    ENV_TRAINING_JOB,
)
from trainer.contract.training import load_training_config, parse_override

TORCHX_ROLE = "trainer"
TORCHX_IMAGE = "vlctl/trainer:0.1.0"  # k8s/docker/trainer.Dockerfile
TORCHX_RDZV_PORT = 29500
TORCHX_METRICS_BASE_PORT = 9500
TORCHX_RDZV_PORT_NAME = "rendezvous"
TORCHX_METRICS_PORT_PREFIX = "metrics-"


def train(
    config: str,
    *overrides: str,
    name: str = "vlctl-train",
    nnodes: int = 1,
    nproc_per_node: int = 1,
    image: str = TORCHX_IMAGE,
    gpus_per_node: int = 0,
    cpu: int = 8,
    memMB: int = 32768,
    env: Optional[Dict[str, str]] = None,  # noqa: UP006, UP045 - the torchx linter's spelling
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,  # noqa: UP006, UP045 - the torchx linter's spelling
    rdzv_port: int = TORCHX_RDZV_PORT,
    metrics_port: int = TORCHX_METRICS_BASE_PORT,
    metrics_host: str = "0.0.0.0",
) -> specs.AppDef:
    """Train a Qwen2-VL model with vlctl's trainer: torchrun on every node, `python -m trainer.train`.

    Args:
        config: the trainer's YAML or JSON configuration, a path in the image (local_cwd: in the current folder)
        overrides: trainer overrides, key.path=value (e.g. training.steps=20 parallel.dp=2); torchx macros such
            as ${app_id} are substituted
        name: the application name (torchx adds a unique suffix to make the app id)
        nnodes: number of nodes (one replica, one torchrun agent each)
        nproc_per_node: training processes per node (one per GPU on GPU nodes)
        image: the trainer image (ignored by local_cwd)
        gpus_per_node: GPUs per node (nvidia.com/gpu on Kubernetes); 0 trains on CPU
        cpu: CPU cores per node
        memMB: memory per node, in MB
        env: extra environment, e.g. AWS_ENDPOINT_URL=http://minio:9000,OMP_NUM_THREADS=4 (wins over the
            component's own)
        max_retries: scheduler retries of the whole gang; each resumes from the newest checkpoint (on
            Kubernetes only when checkpoint.dir is in object storage: a pod's disk goes with the pod)
        mounts: mounts as torchx parses them, e.g. type=volume,src=datasets,dst=/data,readonly (from Python:
            the list of those comma-separated items)
        rdzv_port: port of the rendezvous store on node 0 (several nodes only)
        metrics_port: base port of the ranks' Prometheus endpoints (base + local rank); 0: each rank picks a free
            port
        metrics_host: address the ranks' metrics endpoints listen on
    """
    _check_arguments(
        nnodes=nnodes,
        nproc_per_node=nproc_per_node,
        gpus_per_node=gpus_per_node,
        rdzv_port=rdzv_port,
        metrics_port=metrics_port,
        config=config,
    )
    own_overrides = [f"job_name={specs.macros.app_id}", f"telemetry.host={metrics_host}"]
    if metrics_port:
        own_overrides.append(f"telemetry.base_port={metrics_port}")
    all_overrides = [*own_overrides, *overrides]
    for override in all_overrides:
        parse_override(override)  # ConfigError (a ValueError) naming the override
    _check_config(config, all_overrides, world_size=nnodes * nproc_per_node)

    entrypoint, args = _command(
        config,
        all_overrides,
        nnodes=nnodes,
        nproc_per_node=nproc_per_node,
        rdzv_port=rdzv_port,
    )
    ports = {}
    if nnodes > 1:
        ports[TORCHX_RDZV_PORT_NAME] = rdzv_port
    if metrics_port:
        ports |= {f"{TORCHX_METRICS_PORT_PREFIX}{r}": metrics_port + r for r in range(nproc_per_node)}
    role = specs.Role(
        name=TORCHX_ROLE,
        image=image,
        entrypoint=entrypoint,
        args=args,
        env=_trainer_env(
            gpus_per_node=gpus_per_node,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            extra=env or {},
        ),
        num_replicas=nnodes,
        resource=specs.Resource(cpu=cpu, gpu=gpus_per_node, memMB=memMB),
        port_map=ports,
        max_retries=max_retries,
        mounts=specs.parse_mounts(mounts) if mounts else [],
    )
    return specs.AppDef(name=name, roles=[role])


def _check_arguments(
    *,
    nnodes: int,
    nproc_per_node: int,
    gpus_per_node: int,
    rdzv_port: int,
    metrics_port: int,
    config: str,
) -> None:
    if not config.strip():
        raise ValueError("config: must name the trainer's configuration file")
    if nnodes < 1:
        raise ValueError(f"nnodes: must be >= 1, got {nnodes}")
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node: must be >= 1, got {nproc_per_node}")
    if gpus_per_node < 0:
        raise ValueError(f"gpus_per_node: must be >= 0, got {gpus_per_node}")
    if gpus_per_node and nproc_per_node > gpus_per_node:
        raise ValueError(
            f"nproc_per_node: {nproc_per_node} processes would share {gpus_per_node} GPUs; use at most one per GPU"
        )
    if not 1 <= rdzv_port <= 65535:
        raise ValueError(f"rdzv_port: must be in 1..65535, got {rdzv_port}")
    if metrics_port:
        last = metrics_port + nproc_per_node - 1
        if metrics_port < 1 or last > 65535:
            raise ValueError(f"metrics_port: ports {metrics_port}..{last} must be within 1..65535")
        if nnodes > 1 and metrics_port <= rdzv_port <= last:
            raise ValueError(f"metrics_port: ports {metrics_port}..{last} overlap rdzv_port {rdzv_port}")


def _check_config(config: str, overrides: list[str], *, world_size: int) -> None:
    """Validate a configuration this machine can read; one that lives only in the image is the trainer's to check."""
    if not Path(config).is_file():
        return
    parsed = load_training_config(config, overrides)  # ConfigError (a ValueError) naming file and field
    if parsed.parallel.world_size != world_size:
        p = parsed.parallel
        raise ValueError(
            f"{config}: parallel dp x tp x pp = {p.dp} x {p.tp} x {p.pp} = {p.world_size}, but nnodes x "
            f"nproc_per_node = {world_size} processes (set parallel.dp=... as an override)"
        )


def _command(
    config: str,
    overrides: list[str],
    *,
    nnodes: int,
    nproc_per_node: int,
    rdzv_port: int,
) -> tuple[str, list[str]]:
    """(entrypoint, args) of every replica; torchx substitutes its macros in the args."""
    trainer = ["-m", "trainer.train", config, *overrides]
    if nnodes == 1:
        torchrun = ["--standalone", "--nnodes=1", f"--nproc-per-node={nproc_per_node}", "--max-restarts=0"]
        return "python", ["-m", "torch.distributed.run", *torchrun, *trainer]
    # `$$` is torchx's escape for a literal `$`: this becomes ${<rank0 variable>:=localhost} for bash (replica 0
    # of some schedulers has no such variable: it is the host).
    rank0_host = f"$${{{specs.macros.rank0_env}:=localhost}}"
    static = [
        f"--nnodes={nnodes}",
        f"--node-rank={specs.macros.replica_id}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=static",
    ]
    rest = [f"--master-port={rdzv_port}", "--max-restarts=0", *trainer]
    # Every argument is quoted (overrides are data, never shell code) except the rank-0 host, which bash expands.
    words = [*map(shlex.quote, static), f"--master-addr={rank0_host}", *map(shlex.quote, rest)]
    return "bash", ["-c", "exec python -m torch.distributed.run " + " ".join(words)]


def _trainer_env(
    *,
    gpus_per_node: int,
    metrics_host: str,
    metrics_port: int,
    extra: dict[str, str],
) -> dict[str, str]:
    env = {
        ENV_TRAINING_JOB: specs.macros.app_id,
        ENV_METRICS_HOST: metrics_host,
        "PYTHONUNBUFFERED": "1",
    }
    if metrics_port:
        env[ENV_METRICS_BASE_PORT] = str(metrics_port)
    if not gpus_per_node:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would look for CUDA otherwise
    return env | extra
