"""What slips past the submit-time memory estimate (issue 11): a local rank meets its memory limit as a
MemoryError in its own log, which the failure rules classify as OutOfMemory, instead of swapping the machine
or meeting the kernel's OOM killer (a SIGKILL that reads as a crash)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from controller.backends.rank_exec import ENV_MEMORY_LIMIT
from controller.failures import AttemptEnd, ExitClass, RankExit, classify
from controller.memory import RANK_LIMIT_HEADROOM, host_memory_bytes, rank_memory_limit
from controller.spec import parse_spec

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _spec(**resources) -> dict:
    return {
        "name": "hungry",
        "resources": {"nodes": 2, "procs_per_node": 2, **resources},
        "training": {
            "model": {"name": "mini"},
            "data": {"paths": ["data.jsonl"], "rows_per_step": 8},
            "parallel": {"dp": 4},
        },
    }


def test_each_local_rank_gets_its_share_of_the_node_or_of_this_machine() -> None:
    assert rank_memory_limit(parse_spec(_spec(memory="8Gi"))) == 4 << 30  # 2 ranks on a node of 8 GiB
    expected = int(host_memory_bytes() * RANK_LIMIT_HEADROOM) // 4  # 4 ranks, all on this machine
    assert rank_memory_limit(parse_spec(_spec())) == expected
    assert rank_memory_limit(parse_spec({**_spec(memory="8Gi"), "backend": "kubernetes"})) is None
    assert rank_memory_limit(parse_spec(_spec(memory="8Gi", gpus_per_node=2))) is None


def test_a_rank_past_its_limit_fails_as_out_of_memory(tmp_path: Path) -> None:
    env = {**os.environ, "RANK": "3", ENV_MEMORY_LIMIT: str(512 << 20), "PYTHONPATH": str(HERE)}
    done = subprocess.run(
        [sys.executable, "-m", "controller.backends.rank_exec", str(tmp_path), "hungry_rank", "2048"],
        cwd=REPO,
        env=env,
        timeout=120,
    )
    log = (tmp_path / "rank-3.log").read_text()
    assert done.returncode == 1 and "allocated" not in log, log
    assert log.rstrip().splitlines()[-1] == "MemoryError", log
    end = AttemptEnd(ranks=(RankExit(rank=3, node="local-1", exit_code=1, log_tail=log),), last_step=4)
    result = classify(end)
    assert result.exit_class is ExitClass.OOM and result.ranks == (3,), result
    assert result.message == "out of memory: rank 3 (local-1) exited with code 1: MemoryError"

    # Without the limit the same rank gets what it asks for (here a modest 256 MiB).
    del env[ENV_MEMORY_LIMIT]
    subprocess.run(
        [sys.executable, "-m", "controller.backends.rank_exec", str(tmp_path), "hungry_rank", "256"],
        cwd=REPO,
        env=env,
        timeout=120,
        check=True,
    )
    assert "allocated 256 MiB" in (tmp_path / "rank-3.log").read_text()
