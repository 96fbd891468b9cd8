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
from controller.backends.stacks import dump_stacks
from controller.backends.torchrun_log import WorkerExit, node_exits, read_failures, root_causes
from controller.ingest import JsonlTelemetry
from trainer.contract.telemetry import ENV_ATTEMPT, ENV_NODE, ENV_TRAINING_JOB

REPO = Path(__file__).resolve().parents[2]
ENV_GANG = "VLCTL_GANG"  # a token per gang, in every process's environment: the sweep's tag
NODE_PREFIX = "local-"
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
    ) -> Gang:
        """`names`: the nodes to run on (local-0, local-1, ... by default; a spare replaces an excluded one)."""
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
        base_env = {
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
        gang = Gang(
            job_name=job_name,
            attempt=attempt,
            run_dir=Path(run_dir),
            token=token,
            procs_per_node=procs_per_node,
        )
        try:
            for rank, name in enumerate(names):
                torchrun = [
                    self.config.python,
                    "-m",
                    "torch.distributed.run",
                    f"--nnodes={nodes}",
                    f"--node-rank={rank}",
                    f"--nproc-per-node={procs_per_node}",
                    "--rdzv-backend=static",
                    f"--master-addr={self.config.host}",
                    f"--master-port={port}",
                    "--max-restarts=0",
                    "-m",
                    "controller.backends.rank_exec",
                    str(logs),
                    self.config.module,
                    str(config_path),
                    *overrides,
                ]
                exit_file = logs / f"node-{name}.exit"
                script = f'{shlex.join(torchrun)}; rc=$?; echo $rc > "$1.tmp" && mv "$1.tmp" "$1"; exit $rc'
                with open(logs / f"node-{name}.log", "ab") as agent_log:
                    proc = subprocess.Popen(
                        ["/bin/sh", "-c", script, "sh", str(exit_file)],
                        cwd=self.config.workdir,
                        env={**base_env, ENV_NODE: name},
                        stdin=subprocess.DEVNULL,
                        stdout=agent_log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                gang._add_node(name, proc, exit_file)
        except BaseException:
            gang.cancel(0)
            raise
        exit_cleanup.register(gang)
        return gang

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

    def _add_node(self, name: str, popen: subprocess.Popen, exit_file: Path) -> None:
        created = psutil.Process(popen.pid).create_time()
        self.nodes.append(_Node(name, popen.pid, created, exit_file, popen))

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
            "nodes": [
                {
                    "name": n.name,
                    "pid": n.pid,
                    "pgid": n.pid,
                    "create_time": n.create_time,
                    "exit_file": str(n.exit_file),
                }
                for n in self.nodes
            ],
        }

    @classmethod
    def attach(cls, record: Mapping[str, Any]) -> Gang:
        """The gang a previous controller launched, from its `record()`. Attached gangs are not killed on exit."""
        try:
            nodes = [
                _Node(n["name"], int(n["pid"]), float(n["create_time"]), Path(n["exit_file"]))
                for n in record["nodes"]
            ]
            gang = cls(
                job_name=record["job_name"],
                attempt=int(record["attempt"]),
                run_dir=Path(record["run_dir"]),
                token=record["token"],
                procs_per_node=int(record.get("procs_per_node", 1)),
                nodes=nodes,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"gang record: missing or invalid field {err}") from err
        gang.detached = True  # the controller that attaches decides; by default a restart must not kill jobs
        return gang

    def _root(self, node: _Node) -> psutil.Process | None:
        """The node's root process, unless it is gone (a pid reused by another process counts as gone)."""
        try:
            proc = psutil.Process(node.pid)
            if abs(proc.create_time() - node.create_time) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except psutil.Error:
            pass
        return None

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
        out: dict[int, int] = {}
        for node in self.nodes:
            for proc in self._tree(node)[1:]:
                try:
                    env = proc.environ()
                    # the agent has no RANK; its workers do (and have the agent as parent)
                    if "RANK" in env and "torch.distributed.run" not in " ".join(proc.cmdline()):
                        out[int(env["RANK"])] = proc.pid
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

    def dump_stacks(self) -> dict[int, str]:
        return dump_stacks(self.rank_pids(), self.log_dir)


def _kill(procs: Sequence[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            continue
