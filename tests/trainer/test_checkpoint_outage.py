"""Checkpoint storage outages (issue 11): a checkpoint folder that cannot be written is a storage outage, not a
crash. Saves fail as CheckpointStorageError and are retried with backoff while training goes on; nothing partial
is ever committed. (A job through a minute-long outage: tests/controller/test_fault_matrix.py. Past
`checkpoint.storage_outage_seconds` the run exits with EXIT_STORAGE_UNAVAILABLE naming the path:
tests/controller/test_storage_outage.py runs that as a job.) The folder is made unwritable for real
from outside the writer (chattr +i as root, see unwritable.py).
"""

from __future__ import annotations

import errno
import logging
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from unwritable import lock, mechanism, unlock, unwritable

from trainer.checkpoint import CheckpointConfig, Checkpointer, CheckpointError, latest_valid, list_checkpoints
from trainer.checkpoint import storage as storage_module
from trainer.contract.training import ConfigError, load_training_config

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture
def how(tmp_path: Path) -> str:
    found, why = mechanism(tmp_path)
    if found is None:
        pytest.fail(f"cannot make a folder unwritable here: {why}")
    return found


def state(step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 8, generator=g)}, {"w.exp_avg": torch.randn(512, generator=g)}


def outage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trainer.checkpoint.outage"]


def attempt(ckpt: Checkpointer, step: int) -> None:
    model, optimizer = state(step)
    ckpt.attempt(step, model=model, optimizer=optimizer, tokens_seen=step)


# ---------------------------------------------------------------------------------------------- config


def test_storage_outage_seconds_is_validated_naming_the_field():
    assert CheckpointConfig(uri="/x").storage_outage_seconds == 600.0
    assert CheckpointConfig(uri="/x", storage_outage_seconds=0).storage_outage_seconds == 0
    for bad in (-1, float("inf"), "10", True):
        with pytest.raises(ValueError, match="^storage_outage_seconds must be a finite number >= 0"):
            CheckpointConfig(uri="/x", storage_outage_seconds=bad)
    overrides = ["data.corpora=[c]", "checkpoint.storage_outage_seconds=-5"]
    with pytest.raises(ConfigError, match="checkpoint.storage_outage_seconds") as err:
        load_training_config(None, overrides)
    assert "\n" not in str(err.value)
    ok = load_training_config(None, ["data.corpora=[c]", "checkpoint.storage_outage_seconds=30"])
    assert ok.checkpoint.storage_outage_seconds == 30


# ---------------------------------------------------------------------------------------------- errors


def test_storage_failures_are_told_from_other_errors():
    from trainer.checkpoint import storage_failure

    storage = [
        OSError(errno.EPERM, "Operation not permitted"),
        OSError(errno.EACCES, "Permission denied"),
        OSError(errno.EROFS, "Read-only file system"),
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EIO, "Input/output error"),
        PermissionError("Access Denied"),  # s3fs: HTTP 403, no errno
        ConnectionError("endpoint unreachable"),
    ]
    for e in storage:
        assert storage_failure(e) is e
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = storage[3]
    assert storage_failure(wrapped) is storage[3]
    dcp = CheckpointException("write failed", {1: (storage[4], None)})  # how DCP reports a rank's failure
    assert storage_failure(dcp) is storage[4]
    for e in (
        RuntimeError("Connection closed by peer"),  # gloo: a rank died
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        OSError(errno.EINVAL, "Invalid argument"),
        ValueError("bad state"),
        CheckpointException("write failed", {0: (ValueError("bug"), None)}),
    ):
        assert storage_failure(e) is None, e


def test_backoff_doubles_to_its_cap_and_the_limit_counts_from_the_first_failure():
    from trainer.checkpoint import StorageOutage
    from trainer.checkpoint.outage import RETRY_MAX_S

    outage = StorageOutage(limit_s=300)
    error = _storage_error()
    delays, now = [], 1000.0
    for _ in range(9):
        outage.failed(error, now)
        delays.append(outage.next_retry_at - now)
        assert not outage.retry_due(now) and outage.retry_due(outage.next_retry_at)
        now = outage.next_retry_at
    assert delays == [1, 2, 4, 8, 16, 32, RETRY_MAX_S, RETRY_MAX_S, RETRY_MAX_S]
    assert outage.since == 1000.0 and outage.seconds(1100.0) == 100.0
    assert not outage.expired(1299.9) and outage.expired(1300.0)
    outage.committed(7, 1301.0)
    assert not outage.active and outage.seconds(1400.0) == 0 and not outage.expired(5000.0)


def _storage_error():
    from trainer.checkpoint import CheckpointStorageError

    return CheckpointStorageError("x", step=3, uri="/ckpt", error="PermissionError: denied")


# ---------------------------------------------------------------------------------------------- one process


def test_an_unwritable_root_is_an_outage_that_commits_nothing_and_a_retry_ends_it(
    tmp_path, how, monkeypatch, caplog
):
    root = tmp_path / "ckpt"
    ckpt = Checkpointer(CheckpointConfig(uri=str(root), async_save=True, storage_outage_seconds=60))
    attempt(ckpt, 1)
    ckpt.settle()
    assert ckpt.committed_step == 1 and not ckpt.outage.active

    # The root becomes unwritable before a save starts: rank 0 cannot create the step folder.
    caplog.set_level(logging.WARNING, logger="trainer.checkpoint.outage")
    with unwritable(root, how):
        attempt(ckpt, 2)  # no exception: the failure is for settle() to find
        ckpt.settle()
    assert ckpt.outage.active and ckpt.outage.failures == 1 and ckpt.committed_step == 1
    (line,) = outage_lines(caplog)
    assert re.search(
        rf"checkpoint step 2 not saved, storage unavailable at {root}: .*(PermissionError)", line
    )
    assert "training goes on, retry 1 in 1 s" in line

    # ... and while a save is writing: its shards land in the step folder, the commit's rename fails.
    release, writing = threading.Event(), threading.Event()
    original = storage_module.CheckpointStore.write_file

    def held_write_file(self, *args, **kwargs):
        writing.set()
        assert release.wait(timeout=60)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(storage_module.CheckpointStore, "write_file", held_write_file)
    attempt(ckpt, 3)
    assert writing.wait(timeout=60)
    lock(root, how)
    try:
        release.set()
        while not ckpt.outage_flags(time.monotonic())[0]:  # the save in flight has finished
            time.sleep(0.01)
        ckpt.settle()
    finally:
        unlock(root, how)
    monkeypatch.setattr(storage_module.CheckpointStore, "write_file", original)
    assert ckpt.outage.failures == 2 and "checkpoint step 3 not saved" in outage_lines(caplog)[-1]
    assert "rank 0: commit failed: PermissionError" in outage_lines(caplog)[-1]
    assert [s.step for s in list_checkpoints(str(root))] == [1]  # nothing partial is committed
    assert latest_valid(str(root)).step == 1

    # Writable again: the next attempt commits the newest state, ends the outage, and prunes the leftovers.
    attempt(ckpt, 4)
    ckpt.settle()
    assert not ckpt.outage.active and ckpt.committed_step == 4
    assert [s.step for s in list_checkpoints(str(root))] == [1, 4]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000004"]
    ckpt.close()


def test_a_synchronous_save_records_the_outage_too_and_other_failures_still_raise(tmp_path, how, monkeypatch):
    root = tmp_path / "ckpt"
    root.mkdir()
    ckpt = Checkpointer(CheckpointConfig(uri=str(root), async_save=False))
    with unwritable(root, how):
        attempt(ckpt, 1)
    assert ckpt.outage.active and ckpt.committed_step is None
    attempt(ckpt, 2)
    assert not ckpt.outage.active and ckpt.committed_step == 2

    def broken_write_file(self, folder, name, data, *, rank):
        raise ValueError("a bug, not the storage")

    monkeypatch.setattr(storage_module.CheckpointStore, "write_file", broken_write_file)
    with pytest.raises(CheckpointError, match="step 3 was not saved: rank 0: ValueError: a bug"):
        attempt(ckpt, 3)
    assert not ckpt.outage.active
