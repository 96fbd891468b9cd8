"""Checkpointer: sharded, asynchronous, committed saves, and resume; what the training loop calls.

    ckpt = Checkpointer(CheckpointConfig(uri="/ckpt/run-7", interval_steps=500), layout=layout)
    restored = ckpt.load(model=model_state, optimizer=optim_state)   # None on a fresh run
    ...
    if ckpt.due(step):
        ckpt.save(step, model=model_state, optimizer=optim_state, tokens_seen=tokens,
                  scheduler=scheduler.state_dict(), config=run_config_json,
                  per_rank={"rng": capture_rng(), "data_loader": loader.state_dict()})
    ckpt.close()                                                     # waits for the save in flight

What the runtime hands over, on every rank, with the same call order on all ranks:

* `model`, `optimizer`: {name: Tensor | DTensor | LocalChunk}, tensors only (DCP would unpickle anything
  else on load). A name identifies one global tensor, the same at every layout that can load it:
  - model weights under their full `Qwen2VL.state_dict()` names (what export reads), whichever pipeline stage
    holds them. Replicated tensors (the same on all dp ranks, or on all tp ranks) are plain tensors, saved
    once. A tensor-parallel shard is a LocalChunk (or a DTensor) of the full weight; for the fused ViT qkv,
    of its blocked view (`ParamLayout.blocked`: local view, global view shape, offsets), used at every tp
    size, tp = 1 included, so that the saved shape does not depend on tp (export undoes the blocking);
  - ZeRO-1 optimizer state per parameter: for each of fp32, exp_avg, exp_avg_sq,
    `LocalChunk(fragment, (total,), (start,))`: the range of the flattened local parameter this dp rank owns
    (trainer.parallel's `Fragment`), named e.g. "text.layers.3.mlp.up_proj.weight.exp_avg". With tp > 1 the
    flattened local parameter is a tp shard, so the name must carry the tp rank and size (e.g. a "tp1of2."
    prefix). Scalars such as the Adam step: 0-d tensors.
* `scheduler`, `config`, `extra`: JSON values in meta.json. `per_rank`: plain types and tensors, saved to
  rank-NNNNN.pt and checked on save to load with torch.load(weights_only=True).

Layout changes on load: data-parallel size, any (DCP reads each rank's new pieces from the saved ones).
Pipeline-parallel size, any (names are global, fragments are per parameter). Tensor-parallel size: model
weights yes when shards are LocalChunks/DTensors of the full weight; optimizer state no (its fragments are
ranges of a tp shard). A layout change that a tensor cannot follow fails in DCP naming the tensor, or with a
shape mismatch; it never loads silently wrong.

Decisions:

* Async: save() blocks while the previous save finishes (one in flight: staging buffers are reused) and while
  the state is copied to CPU (see staging.py); the writes, checksums, manifest and commit run in one
  background thread. A failed save raises CheckpointError from the next save(), wait() or close(): a run that
  cannot checkpoint should stop, and the controller resumes it from the last committed step.
* Except when the storage is unavailable (see outage.py): then every rank raises CheckpointStorageError, and a
  loop that trains through outages calls `settle()` and `attempt()` instead of wait() and save(): they record
  such failures in `outage` rather than raise them. `outage_flags()` is each rank's view of what to do next
  (the save in flight has finished, a retry is due, the outage limit has passed), for the loop to agree on
  with an all-reduce at its step boundary; `settle()` after a finished save, and its outcome is the same on
  every rank.
* Sync saves write straight from the live tensors (no staging copy; views are re-seated so that DCP does not
  clone them either, see staging.py).
* The commit decision is rank 0's after a gather: every rank reports its files with sizes and CRC-32s or its
  error; rank 0 writes meta.json, then the manifest, then commits, and broadcasts the outcome. A rank that
  dies mid-save fails the gather (gloo notices the closed connection, or the group timeout fires), so
  nothing is committed.
* Retention runs on rank 0 after each commit: keep the newest `keep_last` committed steps and always the
  newest one that verifies; delete unfinished saves older than the newest commit.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from trainer.checkpoint.group import CheckpointGroup
from trainer.checkpoint.load import CheckpointError, Restored, restore
from trainer.checkpoint.outage import CheckpointStorageError, StorageOutage, describe, storage_failure
from trainer.checkpoint.staging import Stager, trim_storage
from trainer.checkpoint.storage import CheckpointStore
from trainer.contract.checkpoint import (
    FORMAT,
    META,
    CheckpointConfig,
    CheckpointMeta,
    Layout,
    Manifest,
    ManifestFile,
    crc_hex,
    rank_filename,
)

log = logging.getLogger(__name__)


def _check_tensors(field: str, state: Mapping[str, Any]) -> None:
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{field}[{name!r}]: must be a Tensor (DTensor, LocalChunk), got {type(value).__name__}"
            )


def _json(field: str, value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{field}: not JSON-serialisable: {e}") from e
    return value


def _first_failure(e: BaseException) -> BaseException:
    """DCP's CheckpointException holds every rank's error; its text is their tracebacks. The first error."""
    failures = getattr(e, "failures", None)
    if isinstance(e, CheckpointException) and isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


def _error(prefix: str, e: BaseException) -> tuple[str, bool]:
    """(one line naming the error, whether it is a storage failure)."""
    storage = storage_failure(e)
    return f"{prefix}{describe(storage or _first_failure(e))}", storage is not None


def _rank_bytes(per_rank: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    try:  # fail now, not at resume
        torch.save(dict(per_rank), buf)
        data = buf.getvalue()
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:
        raise ValueError(f"per_rank: must hold plain types and tensors only ({type(e).__name__}: {e})") from e
    return data


class Checkpointer:
    def __init__(self, config: CheckpointConfig, *, layout: Layout | None = None) -> None:
        """Collective: construct on every rank at the same point (it creates the checkpoint process group)."""
        self.config = config
        self.group = CheckpointGroup(timeout_s=config.timeout_s)
        world = self.group.world_size
        self.layout = layout or Layout(dp=world, tp=1, pp=1, world_size=world)
        if (
            self.layout["dp"] * self.layout["tp"] * self.layout["pp"] != world
            or self.layout["world_size"] != world
        ):
            raise ValueError(
                f"layout: dp*tp*pp and world_size must equal the world size {world}, got {self.layout}"
            )
        self.store = CheckpointStore(config.uri, config.storage_options)
        self._stager = Stager() if config.async_save else None
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if config.async_save else None
        )
        self._pending: Future[str] | None = None
        self._pending_step: int | None = None
        self.outage = StorageOutage(limit_s=config.storage_outage_seconds)
        self.committed_step: int | None = None  # the newest step committed or loaded by this Checkpointer

    def due(self, step: int) -> bool:
        return self.config.interval_steps > 0 and step > 0 and step % self.config.interval_steps == 0

    def save(
        self,
        step: int,
        *,
        model: Mapping[str, torch.Tensor],
        optimizer: Mapping[str, torch.Tensor],
        tokens_seen: int,
        scheduler: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        per_rank: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Future[str]:
        """Save `step` (see the module docstring for the arguments); the future gives the step's URI once it is
        committed. Async: returns once the state is staged; sync: returns a completed future."""
        self.wait()
        for name, value in (("step", step), ("tokens_seen", tokens_seen)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        _check_tensors("model", model)
        _check_tensors("optimizer", optimizer)
        meta = CheckpointMeta(
            format=FORMAT,
            step=step,
            tokens_seen=tokens_seen,
            layout=self.layout,
            scheduler=_json("scheduler", dict(scheduler or {})),
            config=_json("config", dict(config or {})),
            extra=_json("extra", dict(extra or {})),
        )
        meta_bytes = (json.dumps(meta, indent=1) + "\n").encode()
        rank_bytes = _rank_bytes(per_rank or {})
        state = {"model": dict(model), "optimizer": dict(optimizer)}
        if self._pool is None or self._stager is None:
            done: Future[str] = Future()
            done.set_result(self._write(step, trim_storage(state), rank_bytes, meta_bytes))
            return done
        staged = self._stager.stage(state)
        self._pending = self._pool.submit(self._write, step, staged, rank_bytes, meta_bytes)
        self._pending_step = step
        return self._pending

    def wait(self) -> str | None:
        """Block until the save in flight is committed; its URI, None when there was none. Raises its error."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def settle(self) -> str | None:
        """Collective: wait() for the save in flight; a storage failure is recorded in `outage` (its step, path
        and error logged) instead of raised, a commit ends the outage. Its URI; None when there was no save in
        flight or it failed so. Any other failure raises as from wait()."""
        step = self._pending_step
        self._pending_step = None
        try:
            uri = self.wait()
        except CheckpointStorageError as e:
            self.outage.failed(e, time.monotonic())
            return None
        if uri is not None and step is not None:
            self._committed(step)
        return uri

    def attempt(self, step: int, **state: Any) -> None:
        """save() in a loop that trains through storage outages: settles the save in flight first, and records a
        synchronous save's storage failure instead of raising it. Collective, like save()."""
        self.settle()
        try:
            self.save(step, **state)
        except CheckpointStorageError as e:
            self.outage.failed(e, time.monotonic())
            return
        if self._pending is None:  # a synchronous save: committed by now
            self._committed(step)

    def outage_flags(self, now: float) -> tuple[bool, bool, bool]:
        """This rank's view, no collective: (the save in flight has finished, a retry of a failed save is due,
        the outage limit has passed). Agree on them (any rank) before acting: the ranks see them at different
        moments."""
        finished = self._pending is not None and self._pending.done()
        retry = self._pending is None and self.outage.retry_due(now)
        return finished, retry, self.outage.expired(now)

    def _committed(self, step: int) -> None:
        self.committed_step = step if self.committed_step is None else max(step, self.committed_step)
        self.outage.committed(step, time.monotonic())

    def regroup(self) -> None:
        """After in-place recovery re-formed the job's process groups (collective: at the point where a new
        Checkpointer would be built). A save in flight when a rank was lost cannot commit without it: it ends in
        an error, logged as not saved; one that committed before counts. The checkpoint group is made anew."""
        pending, step = self._pending, self._pending_step
        self._pending, self._pending_step = None, None
        if pending is not None:
            try:
                uri = pending.result()
            except Exception as e:  # noqa: BLE001 - a save cut by the failure; the next interval saves again
                log.warning("checkpoint step %s was not saved: the job's groups were re-formed (%s)", step, e)
            else:
                if uri is not None and step is not None:
                    self._committed(step)
        self.group = CheckpointGroup(timeout_s=self.config.timeout_s)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def load(
        self,
        *,
        model: Mapping[str, torch.Tensor],
        optimizer: Mapping[str, torch.Tensor],
        step: int | None = None,
    ) -> Restored | None:
        """Load `step` or the newest valid step into the given tensors (see load.py)."""
        self.wait()
        restored = restore(
            self.group, self.store, model=model, optimizer=optimizer, mode=self.config.verify, step=step
        )
        if restored is not None:
            self.committed_step = restored.step
        return restored

    def _write(self, step: int, state: Any, rank_bytes: bytes, meta_bytes: bytes) -> str:
        try:
            return self._write_step(step, state, rank_bytes, meta_bytes)
        except CheckpointError:
            raise
        except Exception as e:  # a collective failed: a rank died or timed out
            raise CheckpointError(f"checkpoint step {step} was not saved: {type(e).__name__}: {e}") from e

    def _failed(self, step: int, detail: str, storage: bool) -> CheckpointError:
        message = f"checkpoint step {step} was not saved: {detail}"
        if storage:
            return CheckpointStorageError(message, step=step, uri=self.config.uri, error=detail)
        return CheckpointError(message)

    def _write_step(self, step: int, state: Any, rank_bytes: bytes, meta_bytes: bytes) -> str:
        group, store, rank = self.group, self.store, self.group.rank
        start: tuple[str | None, str, bool] = (None, "", False)
        if rank == 0:
            try:
                start = (store.begin(step), "", False)
            except Exception as e:
                start = (None, *_error("rank 0: could not create the step folder: ", e))
        folder, error, storage = group.broadcast(start)
        if folder is None:
            raise self._failed(step, error, storage)
        files: list[ManifestFile] = []
        try:
            writer, records = store.dcp_writer(folder, thread_count=self.config.write_threads)
            dcp.save(state, storage_writer=writer, process_group=group.pg, no_dist=group.pg is None)
            files += [
                ManifestFile(path=name, size=size, crc32=crc_hex(crc), rank=rank)
                for name, (size, crc) in records.items()
            ]
            files.append(store.write_file(folder, rank_filename(rank), rank_bytes, rank=rank))
            if rank == 0:
                files.append(store.write_file(folder, META, meta_bytes, rank=0))
        # DCP raises CheckpointException (a BaseException) on every rank when any rank's writes failed.
        except (Exception, CheckpointException) as e:  # reported through the gather: rank 0 does not commit
            error, storage = _error(f"rank {rank}: ", e)
        reports = group.gather((files, error, storage))
        outcome: tuple[bool, str, bool] = (False, "", False)
        if reports is not None:
            if failed := [(err, st) for _, err, st in reports if err]:
                # A storage failure only when every failing rank says so: one rank's bug must not be retried.
                outcome = (False, "; ".join(err for err, _ in failed), all(st for _, st in failed))
            else:
                everything = sorted((f for fs, _, _ in reports for f in fs), key=lambda f: f["path"])
                manifest = Manifest(format=FORMAT, step=step, world_size=group.world_size, files=everything)
                try:
                    outcome = (True, store.commit(folder, step, manifest), False)
                except Exception as e:
                    outcome = (False, *_error("rank 0: commit failed: ", e))
        committed, detail, storage = group.broadcast(outcome)
        if not committed:
            raise self._failed(step, detail, storage)
        if rank == 0:
            log.info("checkpoint step %d committed: %s", step, detail)
            try:
                store.prune(self.config.keep_last)
            except Exception as e:  # old folders stay until the next commit prunes again
                log.warning("checkpoint retention failed after step %d: %s", step, e)
        return detail
