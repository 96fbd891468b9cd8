"""The training data loader: global packed rows, split over data-parallel ranks, prefetched, resumable exactly.

    source --cost--> CostTable --plan--> global rows --sampler--> this rank's rows --workers--> MicroBatch

Decisions:

- The state is a position in the global row stream (epoch, next_row: the first row of the next step), the seed,
  a fingerprint of everything the plan depends on, and counters. It says nothing about ranks or workers, so a
  resume at another dp_size or worker count trains exactly the rows the uninterrupted run would have trained.
- Each step, this rank's rows go to the workers `micro_batch_rows` at a time, and results are consumed in
  submission order, so which worker built what never shows. Prefetched work is not state: after a resume it is
  built again.
- A step is consumed once its last micro-batch has been handed out; the state then points at the next step.
  Counters advance with every micro-batch, and `state_dict` reports them as of the start of the current step,
  so the position and the counters in a state always describe the same point.
- Threads by default: PIL, PyAV and numpy release the GIL while decoding, and threads hand pixel arrays back
  without pickling them. Processes (spawned: safe beside CUDA and threads) for sources that hold the GIL.
- Counters are per rank, since each rank sees only its rows (sum them across ranks for global metrics, which
  `DataCounters.__add__` does). A resume restores them at the same dp layout; at another one they restart from
  zero with a warning, while the position, which is what exactness needs, carries over at any layout.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from trainer.data.bad_samples import DataCounters, FailureLog, check_bad_fraction
from trainer.data.packing import CostTable, PackingConfig, RowPlan
from trainer.data.rows import (
    BuiltBatch,
    build_batch,
    build_batch_in_worker_process,
    collate_arrays,
    init_worker_process,
)
from trainer.data.sampler import Position, RowStream
from trainer.data.source import SampleSource
from trainer.data.types import PackedRow

logger = logging.getLogger(__name__)

STATE_VERSION = 1
WORKER_TYPES = ("thread", "process")


@dataclass(kw_only=True, slots=True)
class LoaderConfig:
    seed: int = 0
    shuffle: bool = True
    rows_per_step: int = 1  # global rows per optimizer step, over all data-parallel ranks
    micro_batch_rows: int | None = None  # rows per micro-batch on each rank; None: all its rows of a step
    dp_rank: int = 0
    dp_size: int = 1
    num_workers: int = 0  # 0: build batches in the iterating thread
    worker_type: str = "thread"  # "thread" or "process"
    prefetch: int = 2  # micro-batches in flight per worker
    max_bad_fraction: float = 0.01  # of samples seen; above it the loader raises TooManyBadSamples
    min_samples_before_bad_check: int = 1000

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed: must be in [0, 2**64), got {self.seed}")
        for name in ("rows_per_step", "dp_size", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank: must be in [0, dp_size={self.dp_size}), got {self.dp_rank}")
        if self.rows_per_step % self.dp_size:
            raise ValueError(
                f"rows_per_step: {self.rows_per_step} is not divisible by dp_size {self.dp_size}"
            )
        if self.micro_batch_rows is not None and (
            self.micro_batch_rows < 1 or self.rows_per_rank % self.micro_batch_rows
        ):
            raise ValueError(
                f"micro_batch_rows: must divide the rows per rank and step ({self.rows_per_rank}), "
                f"got {self.micro_batch_rows}"
            )
        if self.num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.worker_type not in WORKER_TYPES:
            raise ValueError(f"worker_type: must be one of {WORKER_TYPES}, got {self.worker_type!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        if self.min_samples_before_bad_check < 0:
            raise ValueError(
                f"min_samples_before_bad_check: must be >= 0, got {self.min_samples_before_bad_check}"
            )

    @property
    def rows_per_rank(self) -> int:
        return self.rows_per_step // self.dp_size

    @property
    def rows_per_micro_batch(self) -> int:
        return self.micro_batch_rows or self.rows_per_rank


@dataclass(slots=True)
class MicroBatch:
    step: int
    index: int  # within the step, on this rank
    num_micro_batches: int  # per step, on this rank
    inputs: dict[str, torch.Tensor]  # model keyword arguments: input_ids, labels, segment_ids, vision tensors
    rows: list[Position]  # the global rows, in batch order
    sample_indices: list[list[int]]  # the samples of each row

    @property
    def is_last(self) -> bool:
        """The step's last micro-batch on this rank: time for the optimizer step."""
        return self.index == self.num_micro_batches - 1


def collate(rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
    """Rows -> model keyword arguments (see rows.collate_arrays); the tensors share the arrays' memory."""
    return {name: torch.from_numpy(array) for name, array in collate_arrays(rows).items()}


class _Work(NamedTuple):
    step: int
    index: int
    count: int
    rows: list[Position]
    plans: list[RowPlan]
    next_step: Position  # where the step after this one starts


class _Checkpoint(NamedTuple):
    position: Position  # first row of the next step
    step: int
    counters: DataCounters


class PackedLoader:
    """Iterate for this rank's micro-batches, step after step, across epochs without end."""

    def __init__(
        self,
        source: SampleSource,
        *,
        packing: PackingConfig,
        config: LoaderConfig,
        costs: CostTable | None = None,
    ):
        self.source, self.packing, self.config = source, packing, config
        self.costs = CostTable.from_source(source, packing) if costs is None else costs
        if len(self.costs) != len(source):
            raise ValueError(f"costs: {len(self.costs)} entries for a source of {len(source)} samples")
        self.stream = RowStream(self.costs, packing, seed=config.seed, shuffle=config.shuffle)
        self._fingerprint = {
            **packing.fingerprint(),
            "shuffle": config.shuffle,
            "num_samples": len(source),
            "costs_crc32": self.costs.checksum(),
        }
        self._committed = _Checkpoint(Position(0, 0), 0, DataCounters())
        # Live counters: the committed ones plus the current step's micro-batches so far.
        self.counters = DataCounters()
        self._failures = FailureLog()
        self._pool: Executor | None = None
        self._generation = 0  # bumped by iter() and load_state_dict(); older iterators stop

    @property
    def epoch(self) -> int:
        return self._committed.position.epoch

    @property
    def step(self) -> int:
        return self._committed.step

    def __iter__(self) -> Iterator[MicroBatch]:
        self._generation += 1
        self.counters = self._committed.counters.copy()
        return self._micro_batches(self._generation)

    def _work(self) -> Iterator[_Work]:
        cfg = self.config
        start, step = self._committed.position, self._committed.step
        per = cfg.rows_per_micro_batch
        count = cfg.rows_per_rank // per
        while True:
            rows = self.stream.rank_rows(
                start, rows_per_step=cfg.rows_per_step, dp_rank=cfg.dp_rank, dp_size=cfg.dp_size
            )
            next_step = self.stream.advance(start, cfg.rows_per_step)
            for m in range(count):
                chunk = rows[m * per : (m + 1) * per]
                yield _Work(step, m, count, chunk, [self.stream.row(p) for p in chunk], next_step)
            start, step = next_step, step + 1

    def _micro_batches(self, generation: int) -> Iterator[MicroBatch]:
        depth = self.config.num_workers * self.config.prefetch or 1
        work = self._work()
        pending: deque[tuple[_Work, Future[BuiltBatch] | BuiltBatch]] = deque()
        try:
            while True:
                while len(pending) < depth:
                    item = next(work)
                    pending.append((item, self._submit(item.plans)))
                item, result = pending.popleft()
                built = result.result() if isinstance(result, Future) else result
                if generation != self._generation:
                    raise RuntimeError(
                        "loader: this iterator was superseded by iter() or load_state_dict(); "
                        "iterate the loader again"
                    )
                yield self._deliver(item, built)
        finally:
            for _, result in pending:
                if isinstance(result, Future):
                    result.cancel()

    def _submit(self, plans: list[RowPlan]) -> Future[BuiltBatch] | BuiltBatch:
        cfg = self.config
        if cfg.num_workers == 0:
            return build_batch(self.source, plans, self.packing)
        if self._pool is None:
            if cfg.worker_type == "thread":
                self._pool = ThreadPoolExecutor(cfg.num_workers, thread_name_prefix="data")
            else:
                self._pool = ProcessPoolExecutor(
                    cfg.num_workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=init_worker_process,
                    initargs=(self.source, self.packing),
                )
        if cfg.worker_type == "thread":
            return self._pool.submit(build_batch, self.source, plans, self.packing)
        return self._pool.submit(build_batch_in_worker_process, plans)

    def _deliver(self, item: _Work, built: BuiltBatch) -> MicroBatch:
        c = self.counters
        num_tokens = int(np.count_nonzero(built.arrays["segment_ids"] >= 0))
        c.rows += len(item.plans)
        c.samples_seen += sum(len(p.slots) + len(p.drops) for p in item.plans)
        c.samples_trained += sum(len(s) for s in built.sample_indices)
        c.samples_truncated += built.num_truncated
        c.tokens += num_tokens
        c.padding_tokens += built.arrays["segment_ids"].size - num_tokens
        c.add_failures(built.failures)
        self._failures.report(built.failures)
        check_bad_fraction(
            c, max_fraction=self.config.max_bad_fraction, min_samples=self.config.min_samples_before_bad_check
        )
        if item.index == item.count - 1:
            self._committed = _Checkpoint(item.next_step, item.step + 1, c.copy())
        return MicroBatch(
            step=item.step,
            index=item.index,
            num_micro_batches=item.count,
            inputs={k: torch.from_numpy(v) for k, v in built.arrays.items()},
            rows=item.rows,
            sample_indices=built.sample_indices,
        )

    # ------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        position, step, counters = self._committed
        cfg = self.config
        return {
            "version": STATE_VERSION,
            "epoch": position.epoch,
            "next_row": position.row,
            "step": step,
            "seed": cfg.seed,
            "fingerprint": dict(self._fingerprint),
            "rows_per_step": cfg.rows_per_step,
            "dp_rank": cfg.dp_rank,
            "dp_size": cfg.dp_size,
            "counters": counters.as_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; raises ValueError when it was saved for other data or packing."""
        keys = ("version", "epoch", "next_row", "step", "seed", "fingerprint", "rows_per_step", "dp_rank",
                "dp_size", "counters")  # fmt: skip
        if missing := [k for k in keys if k not in state]:
            raise ValueError(f"loader state: missing {', '.join(missing)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"loader state: version {state['version']} is not {STATE_VERSION}")
        cfg = self.config
        if state["seed"] != cfg.seed:
            raise ValueError(
                f"loader state: seed is {state['seed']} in the checkpoint but {cfg.seed} in "
                "LoaderConfig.seed; the data order would change"
            )
        saved, now = state["fingerprint"], self._fingerprint
        if diffs := [
            f"{k} {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in sorted(saved.keys() | now.keys())
            if saved.get(k) != now.get(k)
        ]:
            raise ValueError(
                "loader state: the packing plan would differ from the checkpoint's, so the resume "
                "would not continue the same data: " + "; ".join(diffs)
            )
        position = Position(int(state["epoch"]), int(state["next_row"]))
        if position.epoch < 0 or not 0 <= position.row < self.stream.plan(position.epoch).num_rows:
            raise ValueError(f"loader state: epoch {position.epoch} has no row {position.row}")
        if state["rows_per_step"] != cfg.rows_per_step:
            logger.warning(
                "data: rows_per_step changed from %d to %d; continuing at epoch %d row %d",
                state["rows_per_step"],
                cfg.rows_per_step,
                *position,
            )
        if (state["dp_rank"], state["dp_size"]) == (cfg.dp_rank, cfg.dp_size):
            counters = DataCounters.from_dict(state["counters"])
        else:
            counters = DataCounters()
            logger.warning(
                "data: state saved by rank %d of %d, loaded by rank %d of %d: the position carries "
                "over, this rank's data counters restart from zero",
                state["dp_rank"],
                state["dp_size"],
                cfg.dp_rank,
                cfg.dp_size,
            )
        self._committed = _Checkpoint(position, int(state["step"]), counters)
        self.counters = counters.copy()
        self._generation += 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> PackedLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
