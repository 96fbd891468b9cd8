"""The packing plan: which samples fill which fixed-length row, for a whole epoch, decided from costs alone.

Decisions:

- The plan is a pure function of (seed, epoch, the cost table, PackingConfig) and of nothing else: not of the
  number of data-parallel ranks or loader workers. Global row r of epoch e is therefore the same in every run,
  which is what lets a run resume exactly at another data-parallel size.
- Order: a seeded permutation that is stable across numpy releases. Samples are sorted by a splitmix64 hash of
  (seed, epoch, index); numpy's Generator streams may change between releases (NEP 19), which would quietly
  change the data order of a run resumed after an upgrade.
- Greedy next-fit in stream order: a sample that does not fit the open row (tokens or vision budget) closes it
  and opens the next. No look-ahead bin packing: that would group samples by size and skew batches, and the
  plan would stop being one cheap pass.
- A sample longer than a row is truncated, in a row of its own, to exactly `row_len` tokens, and only when the
  cut falls after its last vision block and keeps `min_supervised_tokens` labels; otherwise it is dropped
  (too_long). A sample whose vision tokens alone exceed the row budget is dropped (too_much_vision).
- Dropped samples are recorded against the row that was open when they came up, so whoever trains that row
  counts them: once per epoch, at the same point in every run.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from trainer.data.source import SampleSource
from trainer.data.tokenizer import ENDOFTEXT, IMAGE_PAD, VIDEO_PAD

TOO_LONG = "too_long"
TOO_MUCH_VISION = "too_much_vision"
KNOWN_BAD = "known_bad"  # the cost index marks it bad
DROP_REASONS = (TOO_LONG, TOO_MUCH_VISION, KNOWN_BAD)


@dataclass(kw_only=True, slots=True)
class PackingConfig:
    row_len: int = 4096  # tokens per row; every row has exactly this many, padded
    max_vision_tokens_per_row: int | None = (
        None  # image and video pad tokens per row (ViT work); None: no limit
    )
    truncate: bool = True  # truncate over-long samples where that keeps their vision whole; else drop them
    min_supervised_tokens: int = 1  # a truncated sample must keep at least this many supervised tokens
    pad_token_id: int = ENDOFTEXT
    image_token_id: int = IMAGE_PAD
    video_token_id: int = VIDEO_PAD

    def __post_init__(self) -> None:
        if self.row_len < 1:
            raise ValueError(f"row_len: must be positive, got {self.row_len}")
        if self.max_vision_tokens_per_row is not None and self.max_vision_tokens_per_row < 1:
            raise ValueError(
                f"max_vision_tokens_per_row: must be positive or None, got {self.max_vision_tokens_per_row}"
            )
        if self.min_supervised_tokens < 1:
            raise ValueError(f"min_supervised_tokens: must be positive, got {self.min_supervised_tokens}")
        for name in ("pad_token_id", "image_token_id", "video_token_id"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be a token id, got {getattr(self, name)}")
        if self.video_token_id == self.image_token_id:
            raise ValueError("video_token_id: must differ from image_token_id")
        if self.pad_token_id in (self.image_token_id, self.video_token_id):
            raise ValueError("pad_token_id: must not be a vision pad token")

    def fingerprint(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class CostTable:
    """Per-sample costs as compact arrays, built once per dataset and packing config."""

    num_tokens: np.ndarray  # (N,) int64; 0 where the sample is known bad
    num_vision_tokens: np.ndarray  # (N,) int64
    min_cut: np.ndarray  # (N,) int64: shortest allowed truncation (SampleCost.min_cut); -1 where none is

    @classmethod
    def from_source(cls, source: SampleSource, packing: PackingConfig) -> CostTable:
        n = len(source)
        table = np.zeros((3, n), dtype=np.int64)
        for i in range(n):
            cost = source.cost(i)
            if cost is not None:
                cut = cost.min_cut(packing.min_supervised_tokens)
                table[:, i] = (cost.num_tokens, cost.num_vision_tokens, -1 if cut is None else cut)
        return cls(num_tokens=table[0], num_vision_tokens=table[1], min_cut=table[2])

    def __len__(self) -> int:
        return len(self.num_tokens)

    def checksum(self) -> int:
        """CRC-32 of the table: part of the loader's fingerprint, so a resume on changed data is refused."""
        crc = 0
        for a in (self.num_tokens, self.num_vision_tokens, self.min_cut):
            crc = zlib.crc32(np.ascontiguousarray(a, dtype="<i8").tobytes(), crc)
        return crc


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64, which is what the mixer wants.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded sample order of an epoch: a permutation of range(num_samples), the same on every platform."""
    key = _splitmix64(_splitmix64(np.array([seed], dtype=np.uint64)) ^ np.array([epoch], dtype=np.uint64))
    # splitmix64 is a bijection on 64-bit words, so the sort keys are distinct and the order has no ties.
    return np.argsort(_splitmix64(np.arange(num_samples, dtype=np.uint64) ^ key), kind="stable")


class Slot(NamedTuple):
    index: int  # the sample
    num_tokens: int  # its length, as its cost says
    num_vision_tokens: int
    keep: int  # tokens it takes in the row: num_tokens, or row_len where it is truncated


@dataclass(frozen=True, slots=True)
class RowPlan:
    epoch: int
    row: int
    slots: tuple[Slot, ...]
    drops: tuple[tuple[int, str], ...]  # (sample, reason) dropped by the plan, counted with this row


@dataclass(frozen=True, slots=True)
class EpochPlan:
    """Rows of one epoch; the slots of row r are slot_*[row_start[r]:row_start[r + 1]], its drops likewise."""

    epoch: int
    table: CostTable
    slot_index: np.ndarray  # (S,) int64
    slot_keep: np.ndarray  # (S,) int64
    row_start: np.ndarray  # (R + 1,) int64
    drop_index: np.ndarray  # (D,) int64
    drop_reason: np.ndarray  # (D,) int8, index into DROP_REASONS
    drop_start: np.ndarray  # (R + 1,) int64

    @property
    def num_rows(self) -> int:
        return len(self.row_start) - 1

    def row(self, r: int) -> RowPlan:
        if not 0 <= r < self.num_rows:
            raise IndexError(f"row {r} is outside epoch {self.epoch}'s {self.num_rows} rows")
        a, b = self.row_start[r], self.row_start[r + 1]
        index = self.slot_index[a:b]
        slots = zip(
            index.tolist(),
            self.table.num_tokens[index].tolist(),
            self.table.num_vision_tokens[index].tolist(),
            self.slot_keep[a:b].tolist(),
            strict=True,
        )
        c, d = self.drop_start[r], self.drop_start[r + 1]
        drops = zip(
            self.drop_index[c:d].tolist(), (DROP_REASONS[k] for k in self.drop_reason[c:d]), strict=True
        )
        return RowPlan(epoch=self.epoch, row=r, slots=tuple(Slot(*s) for s in slots), drops=tuple(drops))


def plan_epoch(
    table: CostTable, packing: PackingConfig, *, seed: int, epoch: int, shuffle: bool = True
) -> EpochPlan:
    """Pack an epoch greedily in stream order (see the module docstring)."""
    order = epoch_order(len(table), seed, epoch) if shuffle else np.arange(len(table))
    row_len = packing.row_len
    budget = packing.max_vision_tokens_per_row or np.iinfo(np.int64).max
    slot_index: list[int] = []
    slot_keep: list[int] = []
    row_start = [0]
    drop_index: list[int] = []
    drop_reason: list[int] = []
    drop_row: list[int] = []
    used = vision_used = 0
    columns = (table.num_tokens[order], table.num_vision_tokens[order], table.min_cut[order])
    for i, n, v, cut in zip(order.tolist(), *(c.tolist() for c in columns), strict=True):
        if n == 0:
            reason = KNOWN_BAD
        elif v > budget:
            reason = TOO_MUCH_VISION
        elif n > row_len and not (packing.truncate and 0 < cut <= row_len):
            reason = TOO_LONG
        else:
            keep = min(n, row_len)
            if used + keep > row_len or vision_used + v > budget:
                row_start.append(len(slot_index))
                used = vision_used = 0
            slot_index.append(i)
            slot_keep.append(keep)
            used += keep
            vision_used += v
            continue
        drop_index.append(i)
        drop_reason.append(DROP_REASONS.index(reason))
        drop_row.append(len(row_start) - 1)  # the open row
    if used:
        row_start.append(len(slot_index))
    drop_start = np.searchsorted(np.asarray(drop_row, dtype=np.int64), np.arange(len(row_start)))
    return EpochPlan(
        epoch=epoch,
        table=table,
        slot_index=np.asarray(slot_index, dtype=np.int64),
        slot_keep=np.asarray(slot_keep, dtype=np.int64),
        row_start=np.asarray(row_start, dtype=np.int64),
        drop_index=np.asarray(drop_index, dtype=np.int64),
        drop_reason=np.asarray(drop_reason, dtype=np.int8),
        drop_start=drop_start.astype(np.int64),
    )
