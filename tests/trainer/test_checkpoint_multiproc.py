"""Checkpoints across real processes (gloo on CPU): a rank killed mid-save never yields a checkpoint, and a
checkpoint saved by 2 ranks (DTensor shards, ZeRO-1 fragments, row-split weights) loads bit for bit in 1
process and in 3 (uneven shards, fragments at other boundaries)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoint_worker import FLAT_NUMEL, model_state, optimizer_state, rank_rng_seed

from trainer.checkpoint import CheckpointConfig, Checkpointer, latest_valid, list_checkpoints, read_rank_state

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),  # one process on purpose
]

WORKER = Path(__file__).with_name("checkpoint_worker.py")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, root: Path, out: Path) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
        cmd = [sys.executable, str(WORKER), scenario, str(root), str(out)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return procs


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if any(p.poll() is not None for p in procs):
            outputs = "\n".join(p.communicate()[0] for p in procs if p.poll() is not None)
            pytest.fail(f"a rank exited before {path.name} appeared:\n{outputs[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} did not appear")
        time.sleep(0.05)


def finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[tuple[int, str]]:
    results = []
    for p in procs:
        try:
            output, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            output, _ = p.communicate()
        results.append((p.returncode, output))
    return results


def test_killed_ranks_never_commit_and_dp2_checkpoints_reshard(tmp_path, caplog):
    root = tmp_path / "ckpt"

    # 2 ranks: steps 1 and 2 commit; during step 3 rank 1 is killed after writing all of its files.
    procs = launch("save", 2, root, tmp_path / "save")
    wait_for(tmp_path / "save" / "stopped", procs)
    os.kill(procs[1].pid, signal.SIGKILL)
    (rank0_code, rank0_out), _ = finish(procs)
    assert rank0_code == 3, rank0_out[-3000:]
    assert "SAVE FAILED" in rank0_out
    assert [s.step for s in list_checkpoints(str(root))] == [1, 2]
    assert any(p.name.startswith("step-00000003.tmp-") for p in root.iterdir())  # the abandoned save
    assert latest_valid(str(root), verify="checksum").step == 2

    # 1 process, no torch.distributed: every split tensor loads whole, into plain tensors.
    want_model, want_optimizer = model_state(2), optimizer_state(2)
    model = {k: torch.zeros_like(v) for k, v in want_model.items()}
    optimizer = {k: torch.zeros_like(v) for k, v in want_optimizer.items()}
    single = Checkpointer(CheckpointConfig(uri=str(root), verify="checksum", async_save=False))
    restored = single.load(model=model, optimizer=optimizer)
    assert restored is not None and restored.step == 2 and restored.tokens_seen == 2000
    for got, want in ((model, want_model), (optimizer, want_optimizer)):
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert restored.per_rank is None  # saved by 2 ranks: no rank pairing in a world of 1
    assert restored.meta["layout"] == {"dp": 2, "tp": 1, "pp": 1, "world_size": 2}
    for rank in (0, 1):
        state = read_rank_state(restored.uri, rank)
        assert state["data_loader"] == {"rank": rank, "next_row": 20 + rank}
        torch.manual_seed(rank_rng_seed(rank))
        assert torch.equal(state["rng"]["torch"], torch.get_rng_state())

    # 3 ranks: DTensor shards (4, 4, 3) and fragments read from pieces split for 2; then rank 0 is killed
    # after writing the step-4 manifest but before the rename that commits it.
    procs = launch("reload", 3, root, tmp_path / "reload")
    wait_for(tmp_path / "reload" / "stopped", procs)
    os.kill(procs[0].pid, signal.SIGKILL)
    finish(procs)
    reports = [json.loads((tmp_path / "reload" / f"rank-{r}.json").read_text()) for r in range(3)]
    chunk = -(-FLAT_NUMEL // 3)
    for rank, report in enumerate(reports):
        assert report == {
            "step": 2,
            "replicated_equal": True,
            "rows_equal": True,
            "dtensor_equal": True,
            "dtensor_local_numel": min(chunk, FLAT_NUMEL - rank * chunk),
            "fragments_equal": True,
            "scalar": 2,
            "per_rank_is_none": True,
        }
    uncommitted = [p for p in root.iterdir() if p.name.startswith("step-00000004.tmp-")]
    assert len(uncommitted) == 1 and (uncommitted[0] / "manifest.json").exists()
    assert [s.step for s in list_checkpoints(str(root))] == [1, 2]
    assert latest_valid(str(root), verify="checksum").step == 2
