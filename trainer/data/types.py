"""Data types that pass between the stages of the data pipeline.

    JSONL record --formats--> Sample --encode--> EncodedSample --packing--> PackedRow --collate--> model batch

An `EncodedSample` is everything the model needs for one sample, already tokenized and with its vision inputs
preprocessed; packing only concatenates them. Vision tensors are numpy (float32 pixel rows, int grids) so they
pickle cheaply between loader workers; torch tensors appear only in the collated batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100


@dataclass(kw_only=True, slots=True)
class EncodedSample:
    index: int  # global position of the sample in the dataset (what resume state refers to)
    input_ids: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int64, IGNORE_INDEX where not supervised
    pixel_values: np.ndarray | None = None  # (patches, patch_dim) float32, images in order of appearance
    image_grid_thw: np.ndarray | None = None  # (images, 3) int64
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    source: str = ""  # where it came from (file:line or URI), for logs

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_vision_tokens(self) -> int:
        return sum(
            int(g.prod(-1).sum()) // 4 for g in (self.image_grid_thw, self.video_grid_thw) if g is not None
        )


@dataclass(kw_only=True, slots=True)
class PackedRow:
    """Samples concatenated into one fixed-length row; `segment_ids` is -1 on padding."""

    input_ids: np.ndarray  # (row_len,)
    labels: np.ndarray
    segment_ids: np.ndarray
    pixel_values: np.ndarray | None
    image_grid_thw: np.ndarray | None
    pixel_values_videos: np.ndarray | None
    video_grid_thw: np.ndarray | None
    sample_indices: list[int] = field(default_factory=list)
