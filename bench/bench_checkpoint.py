"""Claims: a checkpoint save runs at >= 50% of the disk's raw sequential write speed, and an asynchronous save
blocks training for <= 10% of the time a synchronous save does.

State: one rank's worth of fp32 tensors (default 512 MiB), shaped as the runtime hands it over: a quarter model
weights (a tensor per 8 MiB of state, 64 at 512 MiB, sizes spread log-uniformly over a 512x range), three
quarters ZeRO-1 optimizer state (master copy, exp_avg, exp_avg_sq: three flat buffers, each parameter's range a
LocalChunk view of them) and the Adam step. As in the runtime, the dicts and LocalChunk wrappers are built anew
for every save, untimed (that is the runtime's work before it calls save()). A single-process Checkpointer
saves into a temp dir on the disk under test (--dir, default the system temp dir). After a warm-up save, each
pass times, in turn:

* raw write: os.write of the same number of bytes in 16 MiB chunks plus fsync (the baseline for saves);
* raw read: the same file, read in 16 MiB chunks after posix_fadvise(DONTNEED) dropped it from the page cache;
* save: a synchronous Checkpointer.save: DCP shards with fsync, CRC-32 on the fly, rank file, meta.json,
  manifest, directory fsyncs, rename. Everything is on disk when it returns. Retention deletes nothing here
  (keep_last is above the number of saves): deleting an old step is not writing one;
* async: the time an async_save=True save() call blocks the caller (it stages the state into reused CPU
  buffers; the writes run in a background thread), against the synchronous save of the same pass, timed right
  before or after it (alternating). The first async save also allocates the buffers: reported separately. Its
  write is waited for, untimed, before anything else is timed, so no measurement overlaps a background write;
* load: Checkpointer.load (verify="size") into preallocated tensors, after dropping every file of the step from
  the page cache (the same DONTNEED), so the bytes come from the disk, not from memory; and the same with
  verify="checksum" (every byte read twice: once to check, once to load; the second read may hit the cache).
  Both check that every byte came back.

Page cache: writes are always fsynced before the clock stops; reads start with the files dropped from the
cache. DONTNEED is advice: a kernel may keep pages (this is reported as a read speed far above the disk's).
`ratio` is save MB/s over raw write MB/s, medians of the passes; `async_block_ratio` is the median of the passes'
async/sync ratios (each pair measured back to back; the ratio of the two medians is reported too).

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

from trainer.checkpoint import CheckpointConfig, Checkpointer, LocalChunk, capture_rng

SAVE_TARGET, ASYNC_TARGET = 0.5, 0.10
CHUNK = 16 << 20
# MiB of state per model tensor: a 2B model has about 40 (bf16 weight, fp32 master and moments); fewer MiB per
# tensor is the harder case (more per-tensor work).
MIB_PER_PARAM = 8
MOMENTS = ("fp32", "exp_avg", "exp_avg_sq")

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class TrainState:
    """Model weights and ZeRO-1-style flat optimizer buffers, handed out as the runtime does."""

    def __init__(self, mib: int, *, fill: bool = True) -> None:
        g = torch.Generator().manual_seed(0)
        total = (mib << 20) // 4 // 4  # elements of the model; the optimizer holds three times as many
        num_params = max(8, mib // MIB_PER_PARAM)
        weights = 2.0 ** (torch.rand(num_params, generator=g, dtype=torch.float64) * 9)  # 512x apart
        self.sizes = [max(1, int(w)) for w in (weights / weights.sum() * total).tolist()]
        numel = sum(self.sizes)
        make = (lambda n: torch.randn(n, generator=g)) if fill else torch.zeros
        self.params = {f"layers.{i}.weight": make(n) for i, n in enumerate(self.sizes)}
        self.flats = {key: make(numel) for key in MOMENTS}
        self.step = 7

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def checkpoint_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        optimizer: dict[str, torch.Tensor] = {"step": torch.tensor(self.step)}
        start = 0
        for name, n in zip(self.params, self.sizes, strict=True):
            for key, flat in self.flats.items():
                optimizer[f"{name}.{key}"] = LocalChunk(flat[start : start + n], (n,), (0,))
            start += n
        return dict(self.params), optimizer

    def tensors(self) -> list[torch.Tensor]:
        return [*self.params.values(), *self.flats.values()]

    def equals(self, other: TrainState) -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.tensors(), other.tensors(), strict=True))


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
    parser.add_argument("--reps", type=int, default=None, help="passes (default 5)")
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = parser.parse_args(argv)
    mib = args.mib or (128 if args.quick else 512)
    reps = args.reps or (2 if args.quick else 5)
    train = TrainState(mib)
    target = TrainState(mib, fill=False)
    nbytes = train.nbytes()
    mb = nbytes / 1e6

    with tempfile.TemporaryDirectory(prefix="bench_checkpoint_", dir=args.dir) as tmp:
        work = Path(tmp)
        # Every sync save is kept: retention deletes (rmtree of the previous step) are not part of writing a
        # checkpoint and would be timed too (in async saves they run in the background thread).
        sync = Checkpointer(CheckpointConfig(uri=str(work / "sync"), async_save=False, keep_last=reps + 2))
        checksum = Checkpointer(CheckpointConfig(uri=str(work / "sync"), async_save=False, verify="checksum"))
        asynchronous = Checkpointer(CheckpointConfig(uri=str(work / "async"), async_save=True, keep_last=1))
        block = os.urandom(CHUNK)
        raw = work / "raw.bin"

        def save(ckpt: Checkpointer, step: int) -> float:
            model, optimizer = train.checkpoint_tensors()
            per_rank = {"rng": capture_rng()}
            return timed(lambda: ckpt.save(step, model=model, optimizer=optimizer, tokens_seen=step,
                                           per_rank=per_rank, extra={"loader": {"epoch": 0, "index": step}}))  # fmt: skip

        def load(ckpt: Checkpointer) -> float:
            drop_cache([p for p in (work / "sync").glob("step-*/*") if p.is_file()])
            for tensor in target.tensors():  # so that a load that fills nothing cannot pass the check below
                tensor.zero_()
            model, optimizer = target.checkpoint_tensors()
            start = time.perf_counter()
            restored = ckpt.load(model=model, optimizer=optimizer)
            elapsed = time.perf_counter() - start
            assert restored is not None and target.equals(train), (
                "the loaded state differs from the saved one"
            )
            return elapsed

        save(sync, 0)  # warm-up: first-call costs (imports, allocator) are not the disk's
        first_block = save(asynchronous, 0)
        asynchronous.wait()
        rows: dict[str, list[float]] = {k: [] for k in ("raw_write", "raw_read", "save", "load", "load_checksum",
                                                        "async_block")}  # fmt: skip
        for rep in range(1, reps + 1):
            rows["raw_write"].append(raw_write(raw, nbytes, block))
            rows["raw_read"].append(raw_read(raw))
            raw.unlink()
            # The sync save and the async one back to back, so that both see the same load on a shared host;
            # which goes first alternates.
            for kind in ("save", "async_block") if rep % 2 else ("async_block", "save"):
                rows[kind].append(save(sync if kind == "save" else asynchronous, rep))
                asynchronous.wait()  # not timed: the write overlaps training; it ends before the next clock
            rows["load"].append(load(sync))
            rows["load_checksum"].append(load(checksum))
        for ckpt in (sync, checksum, asynchronous):
            ckpt.close()

    med = {k: statistics.median(v) for k, v in rows.items()}
    speed = {k: round(mb / med[k], 1) for k in ("raw_write", "raw_read", "save", "load", "load_checksum")}
    per_pass = [a / s for a, s in zip(rows["async_block"], rows["save"], strict=True)]
    num_tensors = sum(len(d) for d in train.checkpoint_tensors())
    result: dict[str, object] = {
        "ratio": round(speed["save"] / speed["raw_write"], 3),
        "target": SAVE_TARGET,
        "state_mb": round(mb, 1),
        "tensors": num_tensors,
        "mb_per_s": speed,
        "load_vs_raw_read": round(speed["load"] / speed["raw_read"], 3),
        "sync_save_s": round(med["save"], 3),
        "async_block_s": round(med["async_block"], 4),
        "async_block_first_s": round(first_block, 4),
        "async_block_ratio": round(statistics.median(per_pass), 4),
        "async_block_ratio_per_pass": [round(r, 4) for r in per_pass],
        "async_block_ratio_of_medians": round(med["async_block"] / med["save"], 4),
        "async_target": ASYNC_TARGET,
        "passes": reps,
        "seconds": {k: [round(x, 4) for x in v] for k, v in rows.items()},
    }
    result["meets_targets"] = result["ratio"] >= SAVE_TARGET and result["async_block_ratio"] <= ASYNC_TARGET
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
