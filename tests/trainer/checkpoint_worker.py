"""Test helper: one rank of a multi-process checkpoint run (gloo on CPU), started by test_checkpoint_multiproc.py.

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python checkpoint_worker.py SCENARIO ROOT OUT

The state, every value a function of the step so a load can be checked bit for bit at any world size:
* model: replicated tensors (plain, one bf16) and a row-split weight (a LocalChunk per rank, like a
  tensor-parallel shard);
* optimizer: a flat buffer of FLAT_NUMEL elements as a DTensor with Shard(0) over the 1-D mesh of all ranks
  (built from a zero-padded local buffer, as ZeRO implementations hold it), ZeRO-1 fragments of three
  parameters flattened together and partitioned over the ranks at boundaries that cut through parameters
  (LocalChunks; a rank that owns nothing of a parameter holds an empty one), and a 0-d step counter.

Scenarios:
* save: commit steps 1 and 2 (async), then start step 3 and stop rank 1 once it has written all its files
  (it touches OUT/stopped and sleeps); the test kills it. Rank 0 must fail the save and exit with code 3.
* reload: load the newest valid step, write what was found to OUT/rank-<r>.json, then start step 4 and stop
  rank 0 right after it wrote the manifest, before the rename that commits; the test kills it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from trainer.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    LocalChunk,
    capture_rng,
    storage,
)

FLAT_NUMEL = 11  # splits unevenly over 2 and 3 ranks
PARAMS = {"a.weight": 7, "b.weight": 5, "c.bias": 9}  # 21 elements: partitions of 11 / 7 cut through them


def model_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "embed.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(4, generator=g),
        "proj.weight": torch.randn(6, 3, generator=g),  # split by rows over the ranks
    }


def optimizer_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    fragments = {f"{name}.exp_avg": torch.randn(n, generator=g) for name, n in PARAMS.items()}
    return {"flat.exp_avg_sq": torch.randn(FLAT_NUMEL, generator=g), **fragments, "step": torch.tensor(step)}


def rank_rng_seed(rank: int) -> int:
    return 100 + rank


def rows(n: int, rank: int, world: int) -> tuple[int, int]:
    size = -(-n // world)
    return min(n, rank * size), min(n, (rank + 1) * size)


def zero_ranges(rank: int, world: int) -> dict[str, tuple[int, int]]:
    """This rank's [start, end) in each parameter when all are flattened together and split in equal
    (padded) partitions, as DeepSpeed's ZeRO-1 does."""
    lo, hi = rows(sum(PARAMS.values()), rank, world)
    out, offset = {}, 0
    for name, n in PARAMS.items():
        start = min(max(lo - offset, 0), n)
        out[f"{name}.exp_avg"] = (start, max(min(hi - offset, n), start))  # may be empty
        offset += n
    return out


def split(model: dict, optimizer: dict, mesh, rank: int, world: int) -> tuple[dict, dict]:
    """This rank's view of the full state: what a dp/tp runtime holds (the tensors are copies)."""
    r0, r1 = rows(6, rank, world)
    model = {**model, "proj.weight": LocalChunk(model["proj.weight"][r0:r1].clone(), (6, 3), (r0, 0))}
    lo, hi = rows(FLAT_NUMEL, rank, world)
    padded = torch.zeros(-(-FLAT_NUMEL // world))
    padded[: hi - lo] = optimizer["flat.exp_avg_sq"][lo:hi]
    out = {"flat.exp_avg_sq": DTensor.from_local(padded[: hi - lo], mesh, [Shard(0)], run_check=False,
                                                 shape=(FLAT_NUMEL,), stride=(1,))}  # fmt: skip
    for name, (start, end) in zero_ranges(rank, world).items():
        out[name] = LocalChunk(optimizer[name][start:end].clone(), optimizer[name].shape, (start,))
    out["step"] = optimizer["step"].clone()
    return model, out


def stop(out: Path) -> None:
    (out / "stopped").touch()
    time.sleep(600)


def main(scenario: str, root: str, out: Path) -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    ckpt = Checkpointer(CheckpointConfig(uri=root, keep_last=5, timeout_s=30))
    torch.manual_seed(rank_rng_seed(rank))

    def save(step: int) -> None:
        model, optimizer = split(model_state(step), optimizer_state(step), mesh, rank, world)
        ckpt.save(
            step,
            model=model,
            optimizer=optimizer,
            tokens_seen=step * 1000,
            config={"run": "multiproc"},
            per_rank={"rng": capture_rng(), "data_loader": {"rank": rank, "next_row": step * 10 + rank}},
        )

    def exit_after_wait() -> None:
        try:
            ckpt.wait()
        except CheckpointError as e:
            print(f"SAVE FAILED: {e}", flush=True)
            os._exit(3)
        os._exit(0)  # no teardown: a peer is dead, destroying the process group could hang

    if scenario == "save":
        for step in (1, 2):
            save(step)
            ckpt.wait()
        if rank == 1:
            original = storage.CheckpointStore.write_file

            def write_then_stop(self, folder, name, data, *, rank):
                entry = original(self, folder, name, data, rank=rank)
                stop(out)
                return entry

            storage.CheckpointStore.write_file = write_then_stop
        save(3)
        exit_after_wait()

    if scenario == "reload":
        want_model, want_optimizer = model_state(2), optimizer_state(2)
        model, optimizer = split(
            {k: torch.zeros_like(v) for k, v in want_model.items()},
            {k: torch.zeros_like(v) for k, v in want_optimizer.items()},
            mesh,
            rank,
            world,
        )
        restored = ckpt.load(model=model, optimizer=optimizer)
        flat = optimizer["flat.exp_avg_sq"]
        r0, r1 = rows(6, rank, world)
        report = {
            "step": restored.step if restored else None,
            "replicated_equal": all(
                torch.equal(model[k], want_model[k]) for k in ("embed.weight", "norm.weight")
            ),
            "rows_equal": torch.equal(model["proj.weight"].local, want_model["proj.weight"][r0:r1]),
            "dtensor_equal": torch.equal(flat.full_tensor(), want_optimizer["flat.exp_avg_sq"]),
            "dtensor_local_numel": flat.to_local().numel(),
            "fragments_equal": all(
                torch.equal(optimizer[name].local, want_optimizer[name][start:end])
                for name, (start, end) in zero_ranges(rank, world).items()
            ),
            "scalar": int(optimizer["step"]),
            "per_rank_is_none": restored.per_rank is None if restored else None,
        }
        (out / f"rank-{rank}.json").write_text(json.dumps(report))
        if rank == 0:
            original_fsync = storage._fsync_dir

            def fsync_then_stop(path):
                original_fsync(path)
                if ".tmp-" in os.path.basename(path):  # the step folder, manifest written, not yet renamed
                    stop(out)

            storage._fsync_dir = fsync_then_stop
        save(4)
        exit_after_wait()
    raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
