"""From planned rows to model inputs: encode each slot's sample, check it against its cost, cut it where the plan
says, lay the samples into fixed-length `PackedRow`s and collate rows into batch arrays.

This runs in loader workers (threads or processes), so it is numpy only; the rows' plans travel with each call,
the source and the packing config are set once per worker process.

Decisions:

- A failed slot stays in its row as padding, at its planned place: the row layout is the plan whatever fails,
  so which samples fail never shifts anything else.
- An encoded sample is checked against its cost (length, vision tokens) and against itself (pad tokens against
  its grids and pixel rows, which the model would otherwise reject for the whole batch). A disagreement makes
  the sample bad (cost_mismatch, malformed); it never produces a row that overflows or breaks the model.
- Segment ids number the samples present in a row 0, 1, ... in order; padding is -1.
- Vision tensors are concatenated in row order, so across a batch the pad runs meet their grids row-major,
  which is the order the model's embedding scatter and position rule consume them in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainer.data.bad_samples import COST_MISMATCH, MALFORMED, BadSample, Failure, classify, one_line
from trainer.data.packing import KNOWN_BAD, TOO_MUCH_VISION, PackingConfig, RowPlan, Slot
from trainer.data.source import SampleSource
from trainer.data.types import IGNORE_INDEX, EncodedSample, PackedRow

VISION_FIELDS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
TOKENS_PER_PATCH_GROUP = 4  # the 2x2 spatial merge: one LLM token per four patches (as EncodedSample counts)


@dataclass(slots=True)
class BuiltBatch:
    """One micro-batch as a worker hands it back."""

    arrays: dict[str, np.ndarray]  # collate_arrays of the rows
    sample_indices: list[list[int]]  # per row, the samples in it
    failures: list[Failure]  # samples that failed to encode or were dropped by the plan, in row order
    num_truncated: int


def fit_sample(sample: EncodedSample, slot: Slot, packing: PackingConfig) -> EncodedSample:
    """The sample as it goes into its slot (cut to `slot.keep` tokens); BadSample when it does not fit its cost."""
    n = len(sample)
    if sample.index != slot.index:
        raise BadSample(COST_MISMATCH, f"encode({slot.index}) returned sample {sample.index}")
    if sample.labels.shape != sample.input_ids.shape:
        raise BadSample(
            MALFORMED, f"labels {sample.labels.shape} and input_ids {sample.input_ids.shape} differ"
        )
    if n != slot.num_tokens or sample.num_vision_tokens != slot.num_vision_tokens:
        raise BadSample(
            COST_MISMATCH,
            f"encoded to {n} tokens ({sample.num_vision_tokens} vision), its cost "
            f"says {slot.num_tokens} ({slot.num_vision_tokens} vision)",
        )
    ids = sample.input_ids[: slot.keep]
    for kind, token, grid, pixels in (
        ("image", packing.image_token_id, sample.image_grid_thw, sample.pixel_values),
        ("video", packing.video_token_id, sample.video_grid_thw, sample.pixel_values_videos),
    ):
        patches = 0 if grid is None else int(grid.prod(-1).sum())
        rows = 0 if pixels is None else pixels.shape[0]
        if rows != patches:
            raise BadSample(MALFORMED, f"{rows} {kind} pixel rows for grids of {patches} patches")
        pads, expected = int(np.count_nonzero(ids == token)), patches // TOKENS_PER_PATCH_GROUP
        if pads != expected:
            # Untruncated, the sample contradicts itself; truncated, the cost put the cut inside a vision block.
            reason, where = (
                (MALFORMED, "in the sample") if slot.keep == n else (COST_MISMATCH, "before the cut")
            )
            raise BadSample(reason, f"{pads} {kind} pad tokens {where} for {expected} from its grids")
    if slot.keep == n:
        return sample
    labels = sample.labels[: slot.keep]
    if np.count_nonzero(labels != IGNORE_INDEX) < packing.min_supervised_tokens:
        raise BadSample(
            COST_MISMATCH,
            f"cut at {slot.keep} tokens keeps fewer than {packing.min_supervised_tokens} supervised tokens",
        )
    return EncodedSample(
        index=sample.index,
        input_ids=ids,
        labels=labels,
        pixel_values=sample.pixel_values,
        image_grid_thw=sample.image_grid_thw,
        pixel_values_videos=sample.pixel_values_videos,
        video_grid_thw=sample.video_grid_thw,
        source=sample.source,
    )


def pack_row(parts: Sequence[EncodedSample | int], packing: PackingConfig) -> PackedRow:
    """Lay samples out in order, each taking len(sample) tokens; an int is a run of padding that long."""
    row_len = packing.row_len
    ids = np.full(row_len, packing.pad_token_id, dtype=np.int64)
    labels = np.full(row_len, IGNORE_INDEX, dtype=np.int64)
    segments = np.full(row_len, -1, dtype=np.int64)
    vision: dict[str, list[np.ndarray]] = {name: [] for name in VISION_FIELDS}
    indices: list[int] = []
    at = 0
    for part in parts:
        n = part if isinstance(part, int) else len(part)
        if at + n > row_len:
            raise ValueError(f"row_len: the parts need more than {row_len} tokens")
        if not isinstance(part, int):
            ids[at : at + n] = part.input_ids
            labels[at : at + n] = part.labels
            segments[at : at + n] = len(indices)
            indices.append(part.index)
            for name in VISION_FIELDS:
                if (value := getattr(part, name)) is not None:
                    vision[name].append(value)
        at += n
    return PackedRow(
        input_ids=ids,
        labels=labels,
        segment_ids=segments,
        **{name: np.concatenate(v) if v else None for name, v in vision.items()},
        sample_indices=indices,
    )


def collate_arrays(rows: Sequence[PackedRow]) -> dict[str, np.ndarray]:
    """Rows -> batch arrays: (B, row_len) token arrays; vision tensors concatenated in row order, absent when no
    row has any (the model takes None for them)."""
    if not rows:
        raise ValueError("collate: no rows")
    lengths = sorted({len(r.input_ids) for r in rows})
    if len(lengths) > 1:
        raise ValueError(f"collate: rows must share one length, got {lengths}")
    out = {
        name: np.stack([getattr(r, name) for r in rows]) for name in ("input_ids", "labels", "segment_ids")
    }
    for name in VISION_FIELDS:
        if parts := [v for r in rows if (v := getattr(r, name)) is not None]:
            out[name] = np.concatenate(parts)
    return out


def _drop_detail(source: SampleSource, index: int, reason: str, packing: PackingConfig) -> str:
    cost = source.cost(index)
    if reason == KNOWN_BAD or cost is None:
        return "marked bad by the cost index"
    if reason == TOO_MUCH_VISION:
        return (
            f"{cost.num_vision_tokens} vision tokens, over max_vision_tokens_per_row "
            f"{packing.max_vision_tokens_per_row}"
        )
    why = "truncation is off"
    if packing.truncate:
        why = (
            f"no cut in the row keeps its vision whole and {packing.min_supervised_tokens} supervised tokens"
        )
    return f"{cost.num_tokens} tokens, over row_len {packing.row_len}, and {why}"


def _known_reason(source: SampleSource, index: int, reason: str) -> str:
    """A sample the cost index marked bad counts under the reason the index found (missing, corrupt_image, ...)
    when the source kept it (optional `bad_reason(index)`), else as known_bad."""
    if reason == KNOWN_BAD and hasattr(source, "bad_reason"):
        return source.bad_reason(index) or reason
    return reason


def _where(source: SampleSource, index: int) -> str:
    cost = source.cost(index)
    if cost is None and hasattr(source, "source_of"):
        return source.source_of(index)
    return "" if cost is None else cost.source


def build_batch(source: SampleSource, plans: Sequence[RowPlan], packing: PackingConfig) -> BuiltBatch:
    """Encode, pack and collate planned rows. Bad samples (ValueError, OSError) become padding and a Failure."""
    rows: list[PackedRow] = []
    failures: list[Failure] = []
    num_truncated = 0
    for plan in plans:
        parts: list[EncodedSample | int] = []
        for slot in plan.slots:
            try:
                parts.append(fit_sample(source.encode(slot.index), slot, packing))
            except (ValueError, OSError) as e:
                failures.append(Failure(slot.index, classify(e), one_line(e), _where(source, slot.index)))
                parts.append(slot.keep)
                continue
            num_truncated += slot.keep < slot.num_tokens
        failures.extend(
            Failure(
                i,
                _known_reason(source, i, reason),
                _drop_detail(source, i, reason, packing),
                _where(source, i),
            )
            for i, reason in plan.drops
        )
        rows.append(pack_row(parts, packing))
    return BuiltBatch(
        arrays=collate_arrays(rows),
        sample_indices=[r.sample_indices for r in rows],
        failures=failures,
        num_truncated=num_truncated,
    )


# Worker processes get the source and config once, at start, rather than with every call.
_process_state: tuple[SampleSource, PackingConfig] | None = None


def init_worker_process(source: SampleSource, packing: PackingConfig) -> None:
    global _process_state
    _process_state = (source, packing)


def build_batch_in_worker_process(plans: Sequence[RowPlan]) -> BuiltBatch:
    assert _process_state is not None, "init_worker_process was not called in this process"
    return build_batch(_process_state[0], plans, _process_state[1])
