"""Real `EncodedSample`s for the packing and loader tests, laid out as the chat template lays them out.

Text tokens are random ids below the tiny model's special tokens; each image or video is a
`<|vision_start|>`, t*h*w/4 pad tokens and `<|vision_end|>`, with random pixel rows of its grid's shape.
Prompt text and vision blocks are unsupervised, the answer is supervised.
"""

from __future__ import annotations

import numpy as np

from trainer.data.packing import PackingConfig
from trainer.data.types import IGNORE_INDEX, EncodedSample
from trainer.models.qwen2_vl.config import tiny_config

CFG = tiny_config()
PATCH_DIM = CFG.vision.patch_dim
TEXT_VOCAB = 400  # ids below the tiny config's special tokens
IMAGE_GRIDS = [(1, 2, 2), (1, 2, 4), (1, 4, 2), (1, 4, 4), (1, 2, 6)]
VIDEO_GRIDS = [(2, 2, 2), (3, 2, 4)]


def packing(**changes) -> PackingConfig:
    """PackingConfig with the tiny model's token ids."""
    return PackingConfig(
        pad_token_id=CFG.pad_token_id,
        image_token_id=CFG.image_token_id,
        video_token_id=CFG.video_token_id,
        **changes,
    )


def make_sample(
    index: int,
    rng: np.random.Generator,
    *,
    prompt: int = 3,
    answer: int = 4,
    images: list[tuple[int, int, int]] = (),
    videos: list[tuple[int, int, int]] = (),
    after: int = 2,
    source: str = "",
) -> EncodedSample:
    """prompt text, the images then the videos, more text, then a supervised answer."""
    ids: list[int] = rng.integers(0, TEXT_VOCAB, prompt).tolist()
    for grids, pad in ((images, CFG.image_token_id), (videos, CFG.video_token_id)):
        for t, h, w in grids:
            ids += [CFG.vision_start_token_id, *[pad] * (t * h * w // 4), CFG.vision_end_token_id]
    ids += rng.integers(0, TEXT_VOCAB, after).tolist()
    labels = [IGNORE_INDEX] * len(ids)
    reply = rng.integers(0, TEXT_VOCAB, answer).tolist()
    ids, labels = ids + reply, labels + reply

    def pixels(grids):
        if not grids:
            return None, None
        rows = rng.standard_normal((sum(t * h * w for t, h, w in grids), PATCH_DIM)).astype(np.float32)
        return rows, np.asarray(grids, dtype=np.int64)

    pixel_values, image_grid_thw = pixels(list(images))
    pixel_values_videos, video_grid_thw = pixels(list(videos))
    return EncodedSample(
        index=index,
        input_ids=np.asarray(ids, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        source=source or f"mem://sample/{index}",
    )


def random_samples(
    count: int, seed: int, *, max_prompt: int = 20, max_answer: int = 12
) -> list[EncodedSample]:
    """A mix of text-only, image and video samples of varied lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = rng.integers(0, 4)
        images = (
            [IMAGE_GRIDS[k] for k in rng.integers(0, len(IMAGE_GRIDS), rng.integers(1, 3))]
            if kind == 1
            else []
        )
        videos = [VIDEO_GRIDS[rng.integers(0, len(VIDEO_GRIDS))]] if kind == 2 else []
        out.append(
            make_sample(
                i,
                rng,
                prompt=int(rng.integers(1, max_prompt)),
                answer=int(rng.integers(1, max_answer)),
                images=images,
                videos=videos,
            )
        )
    return out
