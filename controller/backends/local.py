"""The local backend: a job's ranks run on this machine as a gang of "nodes", each one torchrun agent.

Node i (named local-i) is `torchrun --nnodes=N --node-rank=i --nproc-per-node=P` with the static rendezvous on
127.0.0.1 and a free port; its workers run `MODULE CONFIG OVERRIDES` (`trainer.train` by default) through
`controller.backends.rank_exec`, which sends each rank's output to `<run_dir>/logs/attempt-<k>/rank-<r>.log`.

Decisions:

- torchrun directly, not torchx's local scheduler: the controller needs the pids of every process (cancel, stack
  dumps, outside SIGSTOP in chaos tests) and its own exit record, and torchx would add a layer between us and
  them without adding anything the loop uses (it has its own restarts and log layout, which we do not want).
- Static rendezvous (`--master-addr/--master-port`, node 0's agent hosts the store): the gang is fixed and its
  node names are ours, so node i always holds global ranks i*P .. i*P+P-1 and a slow or dead rank maps to a
  node without asking anyone. c10d would hand out node ranks in arrival order and exists for elasticity we do
  not use: a failure restarts the whole gang from a checkpoint (torchrun's own `--max-restarts` stays 0).
  The port is picked free just before launch; another process taking it in between fails the attempt
  (a retryable launch failure), which is rare and costs one restart.
- Each node starts as `sh -c 'torchrun ...; echo $? > node-local-i.exit'` in a new session. The exit file lets
  a controller that restarted (so is no parent of the agent) still read how the node ended. torchrun's workers
  start their own sessions, so a process group does not cover the tree: cancel walks the tree from the node's
  root, and also sweeps processes tagged with this gang's `VLCTL_GANG` token in their environment, which catches
  a worker whose agent died first (re-parented away from the tree).
- Every process runs in `workdir` (the repository, so `-m trainer.train` resolves): paths a rank gets are
  absolute. Job specs are stored with absolute local paths (controller.spec.prepare_submission); a relative
  run folder is taken against the controller's own directory and passed to the ranks absolute.
- Gangs this process launched are killed when it exits unless detached (see exit_cleanup).
- A node's exit code is torchrun's: 0 when every local rank succeeded, 1 when one failed; the rank's own code is
  in the agent's log (`node-local-i.log`, torchrun's failure report). An agent killed outright leaves no report:
  its node's status (137 for SIGKILL) then stands for its ranks, marked as the agent's, and the node whose exit
  record is oldest holds the root cause (a healthy node that teardown stopped later is never blamed).
- A node whose ranks all finished waits at torchrun's exit barrier for the others (300 s by default), so the
  loop cancels the gang on the first failed node rather than waiting for every node to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from controller.backends import exit_cleanup
from controller.backends.base import EXIT_LOST
from controller.backends.rank_exec import ENV_RANK_BASE, ENV_WORLD_SIZE
from controller.backends.stacks import dump_stacks
from controller.backends.torchrun_log import WorkerExit, node_exits, read_failures, root_causes
from controller.ingest import JsonlTelemetry
from trainer.contract.telemetry import (
    ENV_ATTEMPT,
    ENV_NODE,
    ENV_RECOVERY_MEMBER,
    ENV_RECOVERY_STORE,
    ENV_TRAINING_JOB,
)

REPO = Path(__file__).resolve().parents[2]
ENV_GANG = "VLCTL_GANG"  # a token per gang, in every process's environment: the sweep's tag
NODE_PREFIX = "local-"
COORDINATOR = "coordinator"  # in-place recovery's per-attempt process (trainer.recovery.coordinator)
ROOT_EXIT_SECONDS = 20.0  # how long cancel waits for a node's shell to record the exit before killing it
# torchrun sets these per worker; a controller itself started under torchrun must not pass its own down
_INHERITED_RANK_ENV = frozenset(
    {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}
)

__all__ = ["Gang", "LocalBackend", "LocalBackendConfig", "dump_stacks", "log_dir", "node_names"]


@dataclass(kw_only=True, slots=True)
class LocalBackendConfig:
    module: str = "trainer.train"  # what each rank runs; tests use a fake trainer
    python: str = sys.executable
    workdir: Path = REPO  # cwd of every process: `-m trainer.train` resolves from it
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.module or not all(part.isidentifier() for part in self.module.split(".")):
            raise ValueError(f"module: {self.module!r} is not a dotted module name")
        if not Path(self.python).exists():
            raise ValueError(f"python: {self.python} does not exist")
        if not Path(self.workdir).is_dir():
            raise ValueError(f"workdir: {self.workdir} is not a folder")


def node_names(nodes: int) -> list[str]:
    return [f"{NODE_PREFIX}{i}" for i in range(nodes)]


def log_dir(run_dir: str | Path, attempt: int) -> Path:
    return Path(run_dir) / "logs" / f"attempt-{attempt}"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalBackend:
    def __init__(self, config: LocalBackendConfig | None = None):
        self.config = config or LocalBackendConfig()

    def launch(
        self,
        *,
        job_name: str,
        attempt: int,
        config_path: str | Path,
        overrides: Sequence[str],
        nodes: int,
        procs_per_node: int,
        run_dir: str | Path,
        env: Mapping[str, str] | None = None,
        names: Sequence[str] | None = None,
        excluded: Collection[str] = (),  # local node names are the machines: node_slots already avoided them
        hot_spares: int | None = None,
    ) -> Gang:
        """`names`: the nodes to run on (local-0, local-1, ... by default; a spare replaces an excluded one).
        `hot_spares`: in-place recovery (None: the restart path): a recovery coordinator and this many spare
        nodes start with the gang."""
        if nodes < 1:
            raise ValueError(f"nodes: must be at least 1, got {nodes}")
        names = list(names) if names is not None else node_names(nodes)
        if len(names) != nodes or len(set(names)) != nodes:
            raise ValueError(f"names: expected {nodes} distinct node names, got {names}")
        if procs_per_node < 1:
            raise ValueError(f"procs_per_node: must be at least 1, got {procs_per_node}")
        # A relative run folder (a relative --runs-root) is the controller's: it reads the ranks' telemetry there.
        # The ranks run in `workdir`, so they get it, and the attempt's config, as absolute paths.
        if not Path(run_dir).is_absolute():
            run_dir = Path(run_dir).absolute()
            overrides = [*overrides, f"run_dir={json.dumps(str(run_dir))}"]
        if not Path(config_path).is_absolute() and Path(config_path).exists():
            config_path = Path(config_path).absolute()
        logs = log_dir(run_dir, attempt)
        logs.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        port = _free_port(self.config.host)
        base_env = self.rank_env(env, job_name=job_name, attempt=attempt, token=token)
        gang = Gang(
            job_name=job_name,
            attempt=attempt,
            run_dir=Path(run_dir),
            token=token,
            procs_per_node=procs_per_node,
        )
        trainer_args = [
            "-m",
            "controller.backends.rank_exec",
            str(logs),
            self.config.module,
            str(config_path),
            *overrides,
        ]
        try:
            if hot_spares is not None:
                store_port, http_port = _free_port(self.config.host), _free_port(self.config.host)
                base_env[ENV_RECOVERY_STORE] = gang.recovery_store = f"{self.config.host}:{store_port}"
                coordinator = [
                    self.config.python,
                    "-m",
                    "trainer.recovery.coordinator",
                    f"--world-size={nodes * procs_per_node}",
                    f"--state-file={logs / 'coordinator.json'}",
                    f"--host={self.config.host}",
                    f"--store-port={store_port}",
                    f"--http-port={http_port}",
                ]
                base_env[ENV_WORLD_SIZE] = str(nodes * procs_per_node)
                gang.coordinator = self._start(COORDINATOR, coordinator, base_env, logs)
                gang.coordinator_url = f"http://{self.config.host}:{http_port}"
                gang.spare_args, gang.spare_launch = list(trainer_args), (self, base_env)
                for _ in range(hot_spares):
                    gang.start_spare()
            for index, name in enumerate(names):
                if hot_spares is None:
                    torchrun = [
                        self.config.python,
                        "-m",
                        "torch.distributed.run",
                        f"--nnodes={nodes}",
                        f"--node-rank={index}",
                        f"--nproc-per-node={procs_per_node}",
                        "--rdzv-backend=static",
                        f"--master-addr={self.config.host}",
                        f"--master-port={port}",
                        "--max-restarts=0",
                        *trainer_args,
                    ]
                    gang.nodes.append(self._start(name, torchrun, base_env, logs))
                else:  # independent nodes: see _start_independent
                    env = {**base_env, ENV_RANK_BASE: str(index * procs_per_node)}
                    gang.nodes.append(self._start_independent(name, procs_per_node, trainer_args, env, logs))
        except BaseException:
            gang.cancel(0)
            raise
        exit_cleanup.register(gang)
        return gang

    @staticmethod
    def rank_env(env: Mapping[str, str] | None, *, job_name: str, attempt: int, token: str) -> dict[str, str]:
        """Every process's environment: this one's (less what torchrun sets per worker), the settings every rank
        needs, the controller's `env`, and the gang's identity."""
        return {
            **{k: v for k, v in os.environ.items() if k not in _INHERITED_RANK_ENV},
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
            "PYTHONUNBUFFERED": "1",  # logs are read while the job runs (`vlctl logs --follow`)
            **(env or {}),
            ENV_TRAINING_JOB: job_name,
            ENV_ATTEMPT: str(attempt),
            ENV_GANG: token,
        }

    def _start(self, name: str, argv: Sequence[str], env: Mapping[str, str], logs: Path) -> _Node:
        """`argv` in a shell of a new session that records its exit status in `node-<name>.exit`."""
        exit_file = logs / f"node-{name}.exit"
        script = f'{shlex.join(argv)}; rc=$?; echo $rc > "$1.tmp" && mv "$1.tmp" "$1"; exit $rc'
        with open(logs / f"node-{name}.log", "ab") as agent_log:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", script, "sh", str(exit_file)],
                cwd=self.config.workdir,
                env={**env, ENV_NODE: name},
                stdin=subprocess.DEVNULL,
                stdout=agent_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return _Node(name, proc.pid, psutil.Process(proc.pid).create_time(), exit_file, proc)

    def _start_spare(
        self, name: str, procs_per_node: int, args: Sequence[str], env: Mapping[str, str], logs: Path
    ) -> _Node:
        """A hot spare node: an independent node whose workers wait, torch imported, for the coordinator to give
        them ranks."""
        return self._start_independent(name, procs_per_node, args, {**env, ENV_RECOVERY_MEMBER: name}, logs)

    def _start_independent(
        self, name: str, procs_per_node: int, args: Sequence[str], env: Mapping[str, str], logs: Path
    ) -> _Node:
        """A node of in-place recovery: a torchrun of its own (standalone: its rendezvous is the node), so that no
        node waits for another (the static rendezvous's exit barrier held the survivors for minutes after a node
        was lost) and a node can die and be replaced alone; its workers get their global ranks from ENV_RANK_BASE
        (controller.backends.rank_exec) and meet the others through the recovery store."""
        torchrun = [
            self.config.python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            f"--nproc-per-node={procs_per_node}",
            "--max-restarts=0",
            *args,
        ]
        return self._start(name, torchrun, env, logs)

    def attach(self, record: Mapping[str, Any]) -> Gang:
        return Gang.attach(record)

    def node_slots(self, *, nodes: int, spares: int, excluded: Collection[str]) -> list[str] | None:
        usable = [n for n in node_names(nodes + spares) if n not in excluded]
        return usable[:nodes] if len(usable) >= nodes else None

    def telemetry(
        self,
        *,
        job_name: str,
        run_dir: Path,
        num_ranks: int,
        attempt: int,
        rank_nodes: Sequence[str],
        reattach: bool,
    ) -> JsonlTelemetry:
        """Every rank's JSONL file in the run folder: each step, none missed between two polls."""
        return JsonlTelemetry(run_dir, num_ranks, attempt, nodes=rank_nodes, start_at_end=reattach)

    def reap(self, job_name: str, *, keep: Sequence[str] = ()) -> int:
        """Kill every process of `job_name`'s gangs except those tagged with a token in `keep`; returns how many.

        A controller killed between starting a gang and recording it leaves that gang unknown to the store; the
        next controller reaps it before launching, so two gangs of one job never write the same checkpoints.
        """
        found = []
        for proc in psutil.process_iter():
            try:
                env = proc.environ()
            except psutil.Error:
                continue
            token = env.get(ENV_GANG)
            if token and token not in keep and env.get(ENV_TRAINING_JOB) == job_name:
                found.append(proc)
        _kill(found)
        psutil.wait_procs(found, timeout=5)
        return len(found)


@dataclass(slots=True)
class _Node:
    name: str
    pid: int
    create_time: float
    exit_file: Path
    popen: subprocess.Popen | None = None  # None after a re-attach: not our child


@dataclass(kw_only=True, slots=True, eq=False)
class Gang:
    job_name: str
    attempt: int
    run_dir: Path
    token: str
    procs_per_node: int = 1  # node i holds global ranks i*P .. i*P+P-1
    nodes: list[_Node] = field(default_factory=list)
    detached: bool = False
    # In-place recovery (None / empty on the restart path): the attempt's recovery coordinator, the hot spare
    # nodes not given ranks yet, and each lost node with the spare that took its place.
    coordinator: _Node | None = None
    coordinator_url: str | None = None
    recovery_store: str | None = None  # host:port of the coordinator's store
    spares: list[_Node] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)
    # A spare's trainer arguments (in the record) and (backend, environment) to start it with: the environment
    # is never stored (it may hold secrets), so a re-attached gang gets it again from `resume_spares`.
    spare_args: list[str] | None = None
    spare_launch: tuple[Any, ...] | None = None
    _spare_count: int = 0
    # A node's rank processes once seen ((pid, create time) each), so that the death of one is seen at once,
    # before the node's torchrun notices it and exits (about 0.6 s here); in-place gangs only (`lost_workers`).
    _workers: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    retired: list[_Node] = field(default_factory=list)  # replaced nodes still ending: reaped, never orphaned

    @property
    def can_start_spares(self) -> bool:
        return self.spare_launch is not None

    def start_spare(self) -> str | None:
        """Start one more hot spare node (in the background: it imports torch and waits); its name, or None when
        this gang cannot (re-attached by a controller that has not called `resume_spares`)."""
        if self.spare_launch is None:
            return None
        backend, env = self.spare_launch
        assert self.spare_args is not None
        name = f"{self.job_name}-spare-{self._spare_count}"
        self._spare_count += 1
        self.spares.append(
            backend._start_spare(name, self.procs_per_node, self.spare_args, env, self.log_dir)
        )
        return name

    def resume_spares(self, backend: LocalBackend, env: Mapping[str, str] | None) -> None:
        """A controller that re-attached to this gang starts its spares too: the trainer's arguments come from
        the record, the environment is built again as the launch built it (this controller's own environment
        and `env`, never stored: it may hold secrets), the recovery store from the record's."""
        if self.coordinator is None or self.spare_args is None or self.recovery_store is None:
            return
        env = backend.rank_env(env, job_name=self.job_name, attempt=self.attempt, token=self.token)
        env |= {
            ENV_RECOVERY_STORE: self.recovery_store,
            ENV_WORLD_SIZE: str(len(self.nodes) * self.procs_per_node),
        }
        self.spare_launch = (backend, env)

    def live_spares(self) -> list[str]:
        return [n.name for n in self.spares if self._exit_code(n) is None]

    def coordinator_exit(self) -> int | None:
        """The recovery coordinator's exit code once it ended (killed, crashed), None while it runs."""
        return None if self.coordinator is None else self._exit_code(self.coordinator)

    def lost_spares(self) -> list[tuple[str, int]]:
        """Spare nodes that ended while waiting (killed, crashed), with their exit codes: no longer spares, kept
        to be reaped."""
        lost = []
        for node in list(self.spares):
            if (code := self._exit_code(node)) is not None:
                self.spares.remove(node)
                self.retired.append(node)
                lost.append((node.name, code))
        return lost

    def promote(self, spare: str, *, replacing: str) -> None:
        """The spare node took the lost node's ranks: it stands in the lost node's place (the same ranks). The
        lost node's torchrun may still be ending (its worker's death seen first): it is kept to be reaped."""
        node = next(n for n in self.spares if n.name == spare)
        index = next(i for i, n in enumerate(self.nodes) if n.name == replacing)
        self.spares.remove(node)
        self.retired.append(self.nodes[index])
        self.nodes[index] = node
        self.replaced[replacing] = spare
        self._workers.pop(replacing, None)

    def kill_ranks(self, ranks: Sequence[int], pids: Mapping[int, int] | None = None) -> list[int]:
        """SIGKILL these ranks' processes (a hung node's, to be replaced in place: SIGKILL ends a stopped process
        too); the pids killed. `pids`: a `rank_pids()` the caller already has."""
        pids = self.rank_pids() if pids is None else pids
        killed = []
        for rank in ranks:
            if (pid := pids.get(rank)) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        return killed

    def lost_workers(self) -> list[str]:
        """Running nodes one of whose rank processes died (ended without the trainer's exit record): the node
        has failed, though its torchrun has not exited yet. A node's workers are looked up until all of them are
        seen, then only checked."""
        lost = []
        for node in self.nodes:
            if self._exit_code(node) is not None:
                continue
            workers = self._workers.get(node.name)
            if workers is None:
                tree = self._tree(node)
                found = [(p.pid, p.create_time()) for p in tree[1:] if _is_worker(p)]
                if len(found) == self.procs_per_node:
                    self._workers[node.name] = found
                elif self._dead_child(tree):
                    # A worker that died before this gang first looked (a controller that attached after the
                    # kill): its torchrun has not reaped it yet, and may take seconds to notice under load.
                    lost.append(node.name)
                continue
            # Gone without saying it ended on purpose (the trainer's exit record): killed or crashed.
            if any(
                not _alive(pid, created) and not (self.log_dir / f"exit-{pid}").exists()
                for pid, created in workers
            ):
                lost.append(node.name)
        return lost

    def _dead_child(self, tree: Sequence[psutil.Process]) -> bool:
        """A child of the node's torchrun that ended unreaped (a zombie) without the trainer's exit record: a
        rank killed or crashed (torchrun's children are its workers; a rank's own children are not looked at)."""
        agents = set()
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                if "torch.distributed.run" in proc.cmdline():
                    agents.add(proc.pid)
        for proc in tree:
            try:
                if (
                    proc.status() == psutil.STATUS_ZOMBIE
                    and proc.ppid() in agents
                    and not (self.log_dir / f"exit-{proc.pid}").exists()
                ):
                    return True
            except psutil.Error:
                continue
        return False

    def node_end_time(self, name: str) -> float | None:
        """When the node ended (its exit record's mtime), None while it runs or without a record."""
        node = next((n for n in self.nodes if n.name == name), None)
        try:
            return None if node is None else node.exit_file.stat().st_mtime
        except OSError:
            return None

    def stop_spares(self) -> None:
        """The attempt ended: the spares waiting and the coordinator go too."""
        extra = [n for n in (*self.spares, *self.retired, self.coordinator) if n is not None]
        procs = [p for n in extra for p in self._tree(n)]
        _kill(procs)
        psutil.wait_procs(procs, timeout=5)
        for n in extra:
            if n.popen is not None:
                n.popen.wait()

    @property
    def log_dir(self) -> Path:
        return log_dir(self.run_dir, self.attempt)

    def record(self) -> dict[str, Any]:
        return {
            "job_name": self.job_name,
            "attempt": self.attempt,
            "run_dir": str(self.run_dir),
            "token": self.token,
            "procs_per_node": self.procs_per_node,
            "nodes": [_node_record(n) for n in self.nodes],
            **(
                {
                    "coordinator": _node_record(self.coordinator),
                    "coordinator_url": self.coordinator_url,
                    "spares": [_node_record(n) for n in self.spares],
                    "replaced": dict(self.replaced),
                    "spare_count": self._spare_count,
                    **({"spare_args": list(self.spare_args)} if self.spare_args is not None else {}),
                    **({"recovery_store": self.recovery_store} if self.recovery_store else {}),
                }
                if self.coordinator is not None
                else {}
            ),
        }

    @classmethod
    def attach(cls, record: Mapping[str, Any]) -> Gang:
        """The gang a previous controller launched, from its `record()`. Attached gangs are not killed on exit."""

        def node(n: Mapping[str, Any]) -> _Node:
            return _Node(n["name"], int(n["pid"]), float(n["create_time"]), Path(n["exit_file"]))

        try:
            gang = cls(
                job_name=record["job_name"],
                attempt=int(record["attempt"]),
                run_dir=Path(record["run_dir"]),
                token=record["token"],
                procs_per_node=int(record.get("procs_per_node", 1)),
                nodes=[node(n) for n in record["nodes"]],
            )
            if "coordinator" in record:
                gang.coordinator = node(record["coordinator"])
                gang.coordinator_url = str(record["coordinator_url"])
                gang.spares = [node(n) for n in record["spares"]]
                gang.replaced = {str(k): str(v) for k, v in record["replaced"].items()}
                # The next spare's number: a name is never used twice (its logs and exit record are named after it).
                gang._spare_count = int(record.get("spare_count") or 0)
                gang.spare_args = [str(a) for a in record["spare_args"]] if "spare_args" in record else None
                gang.recovery_store = record.get("recovery_store")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"gang record: missing or invalid field {err}") from err
        gang.detached = True  # the controller that attaches decides; by default a restart must not kill jobs
        return gang

    def _root(self, node: _Node) -> psutil.Process | None:
        """The node's root process, unless it is gone (a pid reused by another process counts as gone)."""
        return _process(node.pid, node.create_time)

    def _exit_code(self, node: _Node) -> int | None:
        if node.popen is not None:
            return node.popen.poll()
        if self._root(node) is not None:
            return None
        try:
            return int(node.exit_file.read_text())
        except (OSError, ValueError):
            return EXIT_LOST

    def poll(self) -> dict[str, int | None]:
        self.retired = [n for n in self.retired if self._exit_code(n) is None]  # reaps the ended ones
        return {n.name: self._exit_code(n) for n in self.nodes}

    def worker_exits(self) -> list[WorkerExit]:
        """Failed ranks with their own exit codes, from the agents' failure summaries (a node's own status for an
        agent that left none); the root cause in the node that ended first comes first."""
        per_node = []
        for index, node in enumerate(self.nodes):
            code = self._exit_code(node)
            if code is None or code == 0 or code == EXIT_LOST:
                continue
            try:
                finished = node.exit_file.stat().st_mtime
            except OSError:
                finished = float("inf")
            summary = read_failures(self.log_dir / f"node-{node.name}.log")
            exits = node_exits(
                summary,
                node=node.name,
                code=code,
                first_rank=index * self.procs_per_node,  # torchrun's --node-rank is the gang position
                procs_per_node=self.procs_per_node,
                finished=finished if finished != float("inf") else None,
            )
            per_node.append((finished, exits))
        return root_causes(per_node)

    def _tree(self, node: _Node) -> list[psutil.Process]:
        root = self._root(node)
        if root is None:
            return []
        try:
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return [root]

    def _tagged(self) -> list[psutil.Process]:
        """Every live process carrying this gang's token, wherever it sits in the process tree."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(ENV_GANG) == self.token and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def pids(self) -> dict[str, list[int]]:
        return {n.name: [p.pid for p in self._tree(n)] for n in self.nodes}

    def rank_pids(self) -> dict[int, int]:
        """Each live rank's pid, by global rank: a snapshot, which can miss a rank caught in its exec from
        rank_exec into the trainer (no environment to read for that moment); callers poll again."""
        out: dict[int, int] = {}
        for index, node in enumerate(self.nodes):
            for proc in self._tree(node)[1:]:
                # The global rank is the node's place in the gang: a promoted spare's environment has no rank
                # of the job's.
                try:
                    if _is_worker(proc):
                        out[index * self.procs_per_node + int(proc.environ()["LOCAL_RANK"])] = proc.pid
                except psutil.Error:
                    continue
        return dict(sorted(out.items()))

    def processes(self) -> list[psutil.Process]:
        """Every live process of the gang: the node trees and anything tagged that left them."""
        seen = {p.pid: p for node in self.nodes for p in self._tree(node)}
        for proc in self._tagged():
            seen.setdefault(proc.pid, proc)
        return list(seen.values())

    def cancel(self, grace_seconds: float) -> None:
        roots = {n.pid for n in self.nodes}

        def stoppable(proc: psutil.Process) -> bool:
            # The node's shell is left alone: it writes the exit record once torchrun has gone, and so is what
            # it runs for that (`mv`, which carries the gang's token too): killed on a loaded machine at the end
            # of the grace period, it left a half-written record and the node read as lost.
            if proc.pid in roots:
                return False
            try:
                return proc.ppid() not in roots or "torch.distributed.run" in proc.cmdline()  # the agent
            except psutil.Error:
                return True

        procs = [p for p in self.processes() if stoppable(p)]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(
                    signal.SIGCONT
                )  # a stopped (SIGSTOP) process acts on SIGTERM only once running
            except psutil.Error:
                continue
        _, alive = psutil.wait_procs(procs, timeout=max(grace_seconds, 0))
        alive += [p for p in self._tagged() if stoppable(p)]
        _kill(alive)
        psutil.wait_procs(alive, timeout=5)
        # The node's shell writes its exit record once torchrun is gone; on a loaded machine that can take
        # seconds, and killing the shell first would lose the record (the node would read as lost).
        for node in self.nodes:
            if node.popen is not None:  # our child: wait through Popen, which keeps its exit status
                try:
                    node.popen.wait(timeout=ROOT_EXIT_SECONDS)
                except subprocess.TimeoutExpired:
                    node.popen.kill()
                    node.popen.wait()
            elif (root := self._root(node)) is not None:
                _, left = psutil.wait_procs([root], timeout=ROOT_EXIT_SECONDS)
                _kill(left)
        exit_cleanup.unregister(self)

    def detach(self) -> None:
        self.detached = True
        exit_cleanup.unregister(self)

    def dump_stacks(
        self, texts: dict[int, str] | None = None, pids: Mapping[int, int] | None = None
    ) -> dict[int, str]:
        return dump_stacks(self.rank_pids() if pids is None else pids, self.log_dir, texts=texts)

    def stopped_ranks(self, pids: Mapping[int, int] | None = None) -> set[int]:
        """Ranks whose process is stopped (SIGSTOP, a debugger): they cannot be waiting on anyone."""
        stopped = set()
        for rank, pid in (self.rank_pids() if pids is None else pids).items():
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() == psutil.STATUS_STOPPED:
                    stopped.add(rank)
        return stopped


def _node_record(n: _Node) -> dict[str, Any]:
    return {
        "name": n.name,
        "pid": n.pid,
        "pgid": n.pid,
        "create_time": n.create_time,
        "exit_file": str(n.exit_file),
    }


def _is_worker(proc: psutil.Process) -> bool:
    """A rank process: torchrun's workers have LOCAL_RANK in their environment, the agent has not."""
    try:
        return "LOCAL_RANK" in proc.environ() and "torch.distributed.run" not in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _process(pid: int, created: float) -> psutil.Process | None:
    """The process `pid` started at `created`, unless it ended (a zombie, or its pid reused by another)."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def _alive(pid: int, created: float) -> bool:
    return _process(pid, created) is not None


def _kill(procs: Sequence[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            continue
