"""Claims: a checkpoint save runs at >= 50% of the disk's raw sequential write speed, and an asynchronous save
blocks training for <= 10% of the time a synchronous save does.

State: one rank's worth of fp32 tensors (default 512 MiB: model weights plus two Adam moments and a master copy,
in 32 MiB tensors), saved by a single-process Checkpointer into a temp dir on the disk under test (--dir,
default the system temp dir). Each pass times, after a warm-up save:

* raw write: os.write of the same number of bytes in 16 MiB chunks plus fsync (the baseline for saves);
* raw read: the same file, read in 16 MiB chunks after posix_fadvise(DONTNEED) dropped it from the page cache;
* save: a synchronous Checkpointer.save: DCP shards with fsync, CRC-32 on the fly, rank file, meta.json,
  manifest, directory fsyncs, rename. Everything is on disk when it returns. Retention deletes nothing here
  (keep_last is above the number of saves): deleting an old step is not writing one;
* load: Checkpointer.load (verify="size") into preallocated tensors, after dropping every file of the step from
  the page cache (the same DONTNEED), so the bytes come from the disk, not from memory; and the same with
  verify="checksum" (every byte read twice: once to check, once to load; the second read may hit the cache);
* async: the time save() blocks with async_save=True (staging copies into reused CPU buffers; the first
  async save also allocates them, reported separately), against the synchronous save.

Page cache: writes are always fsynced before the clock stops; reads start with the files dropped from the
cache. DONTNEED is advice: a kernel may keep pages (this is reported as a read speed far above the disk's).
`ratio` is save MB/s over raw write MB/s, medians of the passes.

    .venv/bin/python -m bench.bench_checkpoint [--quick] [--mib N] [--reps N] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointConfig, Checkpointer

SAVE_TARGET, ASYNC_TARGET = 0.5, 0.10
CHUNK = 16 << 20
TENSOR_MIB = 32

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def make_state(mib: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A quarter model weights, three quarters optimizer state (master, exp_avg, exp_avg_sq)."""
    count = max(4, mib // TENSOR_MIB)
    numel = (mib << 20) // 4 // count
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(numel, generator=g) for _ in range(count)]
    split = count // 4
    model = {f"layer{i}.weight": t for i, t in enumerate(tensors[:split])}
    optimizer = {f"flat{i}": t for i, t in enumerate(tensors[split:])}
    return model, optimizer


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(path: Path, nbytes: int, block: bytes) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(nbytes // len(block)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def raw_read(path: Path) -> float:
    drop_cache([path])
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB, 2 passes")
    parser.add_argument("--mib", type=int, default=None, help="state size in MiB (default 512)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = parser.parse_args(argv)
    mib = args.mib or (128 if args.quick else 512)
    reps = args.reps or (2 if args.quick else 3)
    model, optimizer = make_state(mib)
    nbytes = sum(t.numel() * t.element_size() for t in (*model.values(), *optimizer.values()))
    mb = nbytes / 1e6
    targets = (
        {k: torch.empty_like(v) for k, v in model.items()},
        {k: torch.empty_like(v) for k, v in optimizer.items()},
    )

    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_", dir=args.dir) as tmp:
        work = Path(tmp)
        # Every sync save is kept: retention deletes (rmtree of the previous step) are not part of writing a
        # checkpoint and would be timed too (in async saves they run in the background thread).
        sync = Checkpointer(CheckpointConfig(uri=str(work / "sync"), async_save=False, keep_last=reps + 2))
        checksum = Checkpointer(CheckpointConfig(uri=str(work / "sync"), async_save=False, verify="checksum"))
        asynchronous = Checkpointer(CheckpointConfig(uri=str(work / "async"), async_save=True, keep_last=1))
        block = os.urandom(CHUNK)
        raw = work / "raw.bin"

        def save(ckpt: Checkpointer, step: int) -> None:
            ckpt.save(step, model=model, optimizer=optimizer, tokens_seen=step)

        def load(ckpt: Checkpointer) -> None:
            drop_cache([p for p in (work / "sync").glob("step-*/*") if p.is_file()])
            restored = ckpt.load(model=targets[0], optimizer=targets[1])
            assert restored is not None

        save(sync, 0)  # warm-up: first-call costs (imports, allocator) are not the disk's
        first_block = timed(lambda: save(asynchronous, 0))
        asynchronous.wait()
        rows: dict[str, list[float]] = {k: [] for k in ("raw_write", "raw_read", "save", "load", "load_checksum",
                                                        "async_block")}  # fmt: skip
        for rep in range(1, reps + 1):
            rows["raw_write"].append(raw_write(raw, nbytes, block))
            rows["raw_read"].append(raw_read(raw))
            raw.unlink()
            rows["save"].append(timed(lambda rep=rep: save(sync, rep)))
            rows["load"].append(timed(lambda: load(sync)))
            rows["load_checksum"].append(timed(lambda: load(checksum)))
            rows["async_block"].append(timed(lambda rep=rep: save(asynchronous, rep)))
            asynchronous.wait()  # not timed: the write overlaps training
        assert all(torch.equal(targets[1][k], optimizer[k]) for k in optimizer)
        for ckpt in (sync, checksum, asynchronous):
            ckpt.close()

    med = {k: statistics.median(v) for k, v in rows.items()}
    speed = {k: round(mb / med[k], 1) for k in ("raw_write", "raw_read", "save", "load", "load_checksum")}
    result: dict[str, object] = {
        "ratio": round(speed["save"] / speed["raw_write"], 3),
        "target": SAVE_TARGET,
        "state_mb": round(mb, 1),
        "mb_per_s": speed,
        "load_vs_raw_read": round(speed["load"] / speed["raw_read"], 3),
        "sync_save_s": round(med["save"], 3),
        "async_block_s": round(med["async_block"], 4),
        "async_block_first_s": round(first_block, 4),
        "async_block_ratio": round(med["async_block"] / med["save"], 4),
        "async_target": ASYNC_TARGET,
        "passes": reps,
        "seconds": {k: [round(x, 3) for x in v] for k, v in rows.items()},
    }
    result["meets_targets"] = result["ratio"] >= SAVE_TARGET and result["async_block_ratio"] <= ASYNC_TARGET
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
