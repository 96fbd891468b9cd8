"""Where packed rows get their samples: the `SampleSource` protocol, cheap per-sample costs, an in-memory source.

The loader plans whole epochs from `SampleCost`s before any media is decoded, then asks the source to encode only
the samples of the rows about to be trained on. A cost is what a one-off index pass can learn without decoding:
the token count (text tokenized, vision pad counts from image headers and video metadata), where the vision pad
runs sit (a cut inside one would orphan vision features) and where the supervised tokens sit (a truncated sample
must keep some). `cost(i)` returns None for a sample the index already knows is bad; `encode(i)` raises a
ValueError or OSError for one it finds bad only when decoding (see `trainer.data.bad_samples.classify`).

Spans are half-open `[start, end)` token ranges in increasing order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from trainer.data.tokenizer import IMAGE_PAD, VIDEO_PAD
from trainer.data.types import IGNORE_INDEX, EncodedSample

Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class SampleCost:
    num_tokens: int
    vision_spans: tuple[Span, ...] = ()  # runs of image/video pad tokens
    label_spans: tuple[Span, ...] = ()  # runs of supervised tokens (labels != IGNORE_INDEX)
    source: str = ""  # file:line or URI, for logs

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens: must be positive, got {self.num_tokens}")
        for name in ("vision_spans", "label_spans"):
            end = 0
            for start, stop in getattr(self, name):
                if not end <= start < stop <= self.num_tokens:
                    raise ValueError(
                        f"{name}: ({start}, {stop}) is empty, out of order or past num_tokens "
                        f"({self.num_tokens})"
                    )
                end = stop

    @property
    def num_vision_tokens(self) -> int:
        return sum(stop - start for start, stop in self.vision_spans)

    def min_cut(self, min_supervised_tokens: int) -> int | None:
        """The shortest prefix that keeps every vision block whole and at least `min_supervised_tokens`
        supervised tokens; None when the whole sample has fewer."""
        cut = self.vision_spans[-1][1] if self.vision_spans else 1
        needed = min_supervised_tokens
        for start, stop in self.label_spans:
            if stop - start >= needed:
                return max(cut, start + needed)
            needed -= stop - start
        return None if needed > 0 else cut

    @classmethod
    def from_encoded(
        cls, sample: EncodedSample, *, image_token_id: int = IMAGE_PAD, video_token_id: int = VIDEO_PAD
    ) -> SampleCost:
        ids = sample.input_ids
        return cls(
            num_tokens=len(sample),
            vision_spans=runs((ids == image_token_id) | (ids == video_token_id)),
            label_spans=runs(sample.labels != IGNORE_INDEX),
            source=sample.source,
        )


def runs(mask: np.ndarray) -> tuple[Span, ...]:
    """[start, end) of each run of True in a 1-D boolean mask."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return tuple(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


class SampleSource(Protocol):
    """A dataset of `len(source)` samples addressed by index (`EncodedSample.index`).

    The loader calls `encode` from several threads at once (thread workers), or pickles the source into spawned
    worker processes, so a source must be thread-safe and picklable to be used with workers.
    """

    def __len__(self) -> int: ...

    def cost(self, index: int) -> SampleCost | None:
        """Cheap metadata, without decoding media; None when the sample is known to be bad."""
        ...

    def encode(self, index: int) -> EncodedSample:
        """The sample ready for packing; raises ValueError or OSError when it is bad."""
        ...


class InMemorySource:
    """Already encoded samples held in memory (tests, synthetic data); costs are computed from them once."""

    def __init__(
        self,
        samples: Sequence[EncodedSample],
        *,
        image_token_id: int = IMAGE_PAD,
        video_token_id: int = VIDEO_PAD,
    ):
        for i, sample in enumerate(samples):
            if sample.index != i:
                raise ValueError(f"samples[{i}].index: must equal its position {i}, got {sample.index}")
        self.samples = list(samples)
        self.costs = [
            SampleCost.from_encoded(s, image_token_id=image_token_id, video_token_id=video_token_id)
            for s in self.samples
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def cost(self, index: int) -> SampleCost | None:
        return self.costs[index]

    def encode(self, index: int) -> EncodedSample:
        # Packing copies out of the sample and never writes to it, so handing out the stored arrays is safe.
        return self.samples[index]
