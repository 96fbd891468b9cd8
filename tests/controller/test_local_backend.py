"""The local backend with real processes: torchrun agents running a fake trainer (fast), and one real run.

The fake trainer is a module written into tmp and put on PYTHONPATH; it goes through the same path as
`trainer.train` (torchrun, rank_exec, per-rank logs). Its first argument says what to do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from controller.backends import EXIT_LOST, Gang, LocalBackend, LocalBackendConfig, dump_stacks
from controller.backends import stacks as stacks_module

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))
import train_harness  # noqa: E402

FAKE_TRAINER = """
import faulthandler, os, signal, subprocess, sys, time
mode = sys.argv[1]
rank = int(os.environ["RANK"])
print(f"fake rank {rank} up on {os.environ['VLCTL_NODE']} job {os.environ['VLCTL_TRAINING_JOB']}", flush=True)
if mode == "exit":
    sys.exit(int(sys.argv[2 + rank]))
if mode == "faulthandler":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
if mode == "escape":
    # a grandchild that leaves the tree: its parent exits at once, so it is re-parented away
    code = "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', "
    code += "'import time; time.sleep(600)'], start_new_session=True, stdout=-3, stderr=-3).pid)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    with open(os.path.join(sys.argv[2], f"escaped-{rank}"), "w") as f:
        f.write(out.strip())
def wait_here():
    time.sleep(600)
wait_here()
"""


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "fake_trainer.py").write_text(FAKE_TRAINER)
    return LocalBackend(LocalBackendConfig(module="fake_trainer"))


def _launch(backend: LocalBackend, tmp_path: Path, args: list[str], nodes: int = 2, procs: int = 1) -> Gang:
    return backend.launch(
        job_name="fake",
        attempt=0,
        config_path=args[0],
        overrides=args[1:],
        nodes=nodes,
        procs_per_node=procs,
        run_dir=tmp_path / "run",
        env={"PYTHONPATH": str(tmp_path / "fakepkg")},
    )


def _until(check: Callable[[], object], timeout: float = 45.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def _finished(gang: Gang, timeout: float = 45.0) -> dict[str, int | None]:
    """Every node's exit code, once all have ended."""
    _until(lambda: None not in gang.poll().values(), timeout)
    return gang.poll()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_exit_codes_and_per_rank_logs(backend: LocalBackend, tmp_path: Path) -> None:
    gang = _launch(backend, tmp_path, ["exit", "0", "3"])
    _until(lambda: gang.poll()["local-1"] is not None)
    assert gang.poll()["local-1"] == 1  # torchrun: 1 when a local rank failed
    # local-0's agent, its rank done, waits at torchrun's exit barrier for a peer that will never come:
    # the controller cancels the gang on the first failed node
    gang.cancel(grace_seconds=1)
    logs = tmp_path / "run" / "logs" / "attempt-0"
    assert "fake rank 0 up on local-0 job fake" in (logs / "rank-0.log").read_text()
    assert "fake rank 1 up on local-1 job fake" in (logs / "rank-1.log").read_text()
    assert "exitcode" in (logs / "node-local-1.log").read_text()  # torchrun's failure report names the code
    assert (logs / "node-local-1.exit").read_text().strip() == "1"
    assert gang.pids() == {"local-0": [], "local-1": []}


def test_cancel_kills_the_whole_tree_and_escaped_children(backend: LocalBackend, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    gang = _launch(backend, tmp_path, ["escape", str(marks)], nodes=2, procs=2)
    _until(lambda: len(list(marks.glob("escaped-*"))) == 4)
    ranks = gang.rank_pids()
    assert sorted(ranks) == [0, 1, 2, 3]
    escaped = [int(p.read_text()) for p in marks.glob("escaped-*")]
    everything = [pid for pids in gang.pids().values() for pid in pids] + escaped
    assert set(ranks.values()) <= set(everything)
    assert all(_alive(pid) for pid in everything)
    gang.cancel(grace_seconds=1)
    assert [pid for pid in everything if _alive(pid)] == []
    assert None not in gang.poll().values()


def test_a_dead_node_is_reported_and_cancel_cleans_the_rest(backend: LocalBackend, tmp_path: Path) -> None:
    gang = _launch(backend, tmp_path, ["sleep"])
    _until(lambda: len(gang.rank_pids()) == 2)
    everything = [pid for pids in gang.pids().values() for pid in pids]
    agent_1 = next(
        pid for pid in gang.pids()["local-1"] if "torch.distributed.run" in psutil.Process(pid).cmdline()
    )
    os.kill(agent_1, signal.SIGKILL)  # the worker of local-1 is left behind, in its own session
    _until(lambda: gang.poll()["local-1"] is not None)
    codes = gang.poll()
    assert codes == {"local-0": None, "local-1": 128 + signal.SIGKILL}
    gang.cancel(grace_seconds=1)
    assert [pid for pid in everything if _alive(pid)] == []
    assert gang.poll()["local-0"] is not None


CONTROLLER = """
import json, sys, time
from pathlib import Path
from controller.backends import LocalBackend, LocalBackendConfig
tmp = Path(sys.argv[1])
gang = LocalBackend(LocalBackendConfig(module="fake_trainer")).launch(
    job_name="fake", attempt=1, config_path="sleep", overrides=[], nodes=2, procs_per_node=1,
    run_dir=tmp / "run", env={"PYTHONPATH": str(tmp / "fakepkg")})
while len(gang.rank_pids()) < 2:
    time.sleep(0.1)
if sys.argv[2] == "detach":
    gang.detach()
print(json.dumps(gang.record()), flush=True)
if sys.argv[2] == "stay":
    time.sleep(600)
"""


def _controller(tmp_path: Path, how: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, str(tmp_path), how], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    return proc, json.loads(proc.stdout.readline())


def test_a_detached_gang_outlives_its_controller_and_is_attached_again(
    backend: LocalBackend, tmp_path: Path
) -> None:
    proc, record = _controller(tmp_path, "detach")
    assert proc.wait(timeout=30) == 0
    gang = Gang.attach(json.loads(json.dumps(record)))
    assert gang.poll() == {"local-0": None, "local-1": None}
    # A rank read while it execs from rank_exec into the trainer has no environment for that moment (the kernel
    # has swapped its memory but not yet laid out the new one): a snapshot may miss it, the next one has it.
    _until(lambda: len(gang.rank_pids()) == 2)
    everything = [pid for pids in gang.pids().values() for pid in pids]
    assert all(_alive(pid) for pid in everything)
    gang.cancel(grace_seconds=1)
    assert [pid for pid in everything if _alive(pid)] == []
    codes = gang.poll()  # not our children: read from the nodes' exit records
    assert None not in codes.values() and EXIT_LOST not in codes.values()
    with pytest.raises(ValueError, match="gang record"):
        Gang.attach({"job_name": "x"})


def test_sigterm_to_the_controller_kills_its_gangs(backend: LocalBackend, tmp_path: Path) -> None:
    proc, record = _controller(tmp_path, "stay")
    gang = Gang.attach(record)
    everything = [pid for pids in gang.pids().values() for pid in pids]
    assert len(everything) == 6
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert [pid for pid in everything if _alive(pid)] == []


def test_dump_stacks(backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gang = _launch(backend, tmp_path, ["faulthandler"], nodes=1, procs=2)
    try:
        _until(lambda: len(gang.rank_pids()) == 2)
        logs = gang.log_dir
        ranks = gang.rank_pids()
        _until(lambda: all(stacks_module.catches_signal(pid, signal.SIGUSR1) for pid in ranks.values()))
        if stacks_module.py_spy_path():
            assert gang.dump_stacks() == {0: "py-spy", 1: "py-spy"}
            assert "wait_here" in (logs / "rank-1.log").read_text()
        monkeypatch.setattr(stacks_module, "py_spy_path", lambda: None)
        assert dump_stacks({0: ranks[0]}, logs) == {0: "sigusr1"}
        _until(lambda: (logs / "rank-0.log").read_text().count("wait_here") >= 1)
        assert all(_alive(pid) for pid in ranks.values())
    finally:
        gang.cancel(grace_seconds=1)


def test_dump_stacks_never_kills_a_rank_without_a_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stacks_module, "py_spy_path", lambda: None)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert dump_stacks({0: proc.pid}, tmp_path) == {0: "unavailable"}
        assert proc.poll() is None
        assert "no stacks for rank 0" in (tmp_path / "rank-0.log").read_text()
    finally:
        proc.kill()
        proc.wait()


def test_bad_arguments_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="module"):
        LocalBackendConfig(module="not a module")
    with pytest.raises(ValueError, match="nodes"):
        LocalBackend().launch(
            job_name="j",
            attempt=0,
            config_path="c",
            overrides=[],
            nodes=0,
            procs_per_node=1,
            run_dir=tmp_path,
        )


def test_real_trainer_on_two_nodes(tmp_path: Path) -> None:
    data = train_harness.make_data(tmp_path / "data")
    run_dir = tmp_path / "run"
    config = train_harness.write_config(
        tmp_path / "train.yaml", data, run_dir, training={"steps": 2}, parallel={"dp": 2}
    )
    gang = LocalBackend().launch(
        job_name="real",
        attempt=0,
        config_path=config,
        overrides=["checkpoint.interval_steps=2"],
        nodes=2,
        procs_per_node=1,
        run_dir=run_dir,
    )
    try:
        codes = _finished(gang, timeout=240)
    finally:
        gang.cancel(grace_seconds=5)
    logs = run_dir / "logs" / "attempt-0"
    assert codes == {"local-0": 0, "local-1": 0}, (logs / "rank-0.log").read_text()[-3000:]
    assert len(train_harness.losses(run_dir, 0)) == 2
    assert "Traceback" not in (logs / "rank-1.log").read_text()
    for rank in (0, 1):
        assert (logs / f"rank-{rank}.log").stat().st_size > 0
        assert (run_dir / f"metrics-rank{rank}.endpoint.json").exists()


NODE_SHELL = """
import os, subprocess, sys
# a node: its "torchrun" (this process) and one rank process, which it waits for
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env={**os.environ, "LOCAL_RANK": "0"})
print(worker.pid, flush=True)
worker.wait()
import time; time.sleep(600)  # torchrun still tearing down: the node has not ended yet
"""


def test_a_dead_rank_process_is_seen_before_its_node_ends_and_an_exit_on_purpose_is_not(
    tmp_path: Path,
) -> None:
    """`Gang.lost_workers` (in-place recovery's early detection): a rank process gone without the trainer's exit
    record marks its node lost while the node's torchrun still runs; one that wrote its record is not."""
    from controller.backends.local import _Node

    gang = Gang(job_name="early", attempt=1, run_dir=tmp_path, token="t", procs_per_node=1)
    gang.log_dir.mkdir(parents=True)
    killed_rank = "import time; time.sleep(600)"
    clean_rank = (
        "import os, pathlib, time; time.sleep(1.0); "
        f"pathlib.Path({str(gang.log_dir)!r}, f'exit-{{os.getpid()}}').write_text('0')"
    )
    shells, workers = [], []
    for i, code in enumerate((killed_rank, clean_rank)):
        shell = subprocess.Popen([sys.executable, "-c", NODE_SHELL, code], stdout=subprocess.PIPE, text=True)
        workers.append(int(shell.stdout.readline()))
        shells.append(shell)
        proc = psutil.Process(shell.pid)
        gang.nodes.append(_Node(f"local-{i}", shell.pid, proc.create_time(), tmp_path / f"{i}.exit", shell))
    try:
        assert gang.lost_workers() == []  # the first look finds the rank processes
        assert gang.lost_workers() == []
        os.kill(workers[0], signal.SIGKILL)
        assert _until(lambda: gang.lost_workers()) == ["local-0"]
        _until(lambda: not _alive(workers[1]))  # the other rank ended on purpose
        assert gang.lost_workers() == ["local-0"]
        assert gang.poll() == {"local-0": None, "local-1": None}  # neither node has ended
    finally:
        for shell in shells:
            shell.kill()
            shell.wait()


UNREAPING_NODE = """
import os, subprocess, sys, time
# a node whose "torchrun" (argv names it) has not reaped its rank process yet: a dead rank stays a zombie
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env={**os.environ, "LOCAL_RANK": "0"})
print(worker.pid, flush=True)
time.sleep(600)
"""


def test_a_rank_that_died_before_a_re_attached_controller_first_looked_is_lost(tmp_path: Path) -> None:
    """A controller that attaches after a rank was killed never saw that rank's process: its node is lost while
    its torchrun, slow to notice under load (over a second seen), still holds the dead rank unreaped. A rank that
    ended on purpose (its exit record) and one still running are not lost."""
    from controller.backends.local import _Node

    gang = Gang(job_name="late", attempt=1, run_dir=tmp_path, token="t", procs_per_node=1)
    gang.log_dir.mkdir(parents=True)
    ranks = {
        "local-0": "import time; time.sleep(600)",  # killed below
        "local-1": "import time; time.sleep(600)",  # runs on
        "local-2": f"import os, pathlib; pathlib.Path({str(gang.log_dir)!r}, f'exit-{{os.getpid()}}').write_text('0')",
    }
    shells, workers = [], {}
    for i, (name, code) in enumerate(ranks.items()):
        argv = [sys.executable, "-c", UNREAPING_NODE, code, "torch.distributed.run"]
        shell = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        workers[name] = int(shell.stdout.readline())
        shells.append(shell)
        gang.nodes.append(
            _Node(name, shell.pid, psutil.Process(shell.pid).create_time(), tmp_path / f"{i}.exit", shell)
        )
    try:
        os.kill(workers["local-0"], signal.SIGKILL)
        zombie = lambda pid: psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # noqa: E731
        _until(lambda: zombie(workers["local-0"]) and zombie(workers["local-2"]))
        assert gang.lost_workers() == ["local-0"]  # the first look: no rank process of local-0 was ever seen
        assert gang.poll() == {"local-0": None, "local-1": None, "local-2": None}
    finally:
        for shell in shells:
            shell.kill()
            shell.wait()


def test_the_coordinator_s_end_is_seen_with_its_exit_code(tmp_path: Path) -> None:
    """`Gang.coordinator_exit`: None while the in-place coordinator runs (and on the restart path, which has
    none), its exit code once it ended, as the reconciler's CoordinatorLost event reports it."""
    from controller.backends.local import _Node

    gang = Gang(job_name="c", attempt=1, run_dir=tmp_path, token="t", procs_per_node=1)
    assert gang.coordinator_exit() is None  # no coordinator: the restart path
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    gang.coordinator = _Node(
        "coordinator", proc.pid, psutil.Process(proc.pid).create_time(), tmp_path / "c.exit", proc
    )
    try:
        assert gang.coordinator_exit() is None
        proc.kill()
        assert (
            _until(lambda: gang.coordinator_exit() is not None) and gang.coordinator_exit() == -signal.SIGKILL
        )
    finally:
        proc.kill()
        proc.wait()


def test_a_re_attached_gang_starts_spares_as_the_launch_did(tmp_path: Path) -> None:
    """A controller that re-attached to an in-place gang starts spares too: the trainer's arguments and the
    recovery store come from the record, the environment is built again from this controller's (never stored),
    and a new spare's name is never one already used."""
    from controller.backends.local import ENV_GANG, LocalBackend, _Node
    from controller.backends.rank_exec import ENV_WORLD_SIZE
    from trainer.contract.telemetry import ENV_ATTEMPT, ENV_RECOVERY_STORE

    def node(name: str) -> _Node:
        return _Node(name, os.getpid(), psutil.Process().create_time(), tmp_path / f"{name}.exit")

    gang = Gang(job_name="j", attempt=2, run_dir=tmp_path, token="tok", procs_per_node=1)
    gang.nodes = [node("local-0"), node("j-spare-1")]
    gang.spares = [node("j-spare-3")]
    gang.replaced = {"local-1": "j-spare-1"}
    gang.coordinator, gang.coordinator_url = node("coordinator"), "http://127.0.0.1:1"
    gang.spare_args, gang.recovery_store = (
        ["-m", "controller.backends.rank_exec", "logs", "trainer.train"],
        "h:7",
    )
    gang._spare_count = 4  # spares 0-3 were started (0 and 2 since lost)
    again = Gang.attach(json.loads(json.dumps(gang.record())))
    assert not again.can_start_spares  # attached alone: no environment to start one with
    backend = LocalBackend()
    started = []
    backend._start_spare = lambda name, procs, args, env, logs: (
        started.append((name, args, env)) or node(name)
    )
    again.resume_spares(backend, {"VLCTL_FAULT_RANK": "1"})
    assert again.can_start_spares and again.start_spare() == "j-spare-4"
    ((name, args, env),) = started
    assert args == gang.spare_args and env[ENV_GANG] == "tok" and env[ENV_ATTEMPT] == "2"
    assert env[ENV_RECOVERY_STORE] == "h:7" and env[ENV_WORLD_SIZE] == "2" and env["VLCTL_FAULT_RANK"] == "1"
