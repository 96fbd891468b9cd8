"""Claim: trainer.data.image preprocesses images at >= 1.5x the samples/s of transformers' image processor.

Both sides get the same seeded, already-decoded RGB images (decoding costs the same for both, so it is left
out), one image per call as a data loader would, with the released -Instruct pixel budget (3,136 to
12,845,056). The baseline is transformers 4.57.6's Qwen2VLImageProcessor, the PIL path (the class itself, not
the torchvision "fast" processor). Passes over the image set alternate between the two so that load on the
machine hits both alike; the median pass counts. The warm-up pass doubles as a parity check, reported as
max_abs_diff and grids_equal.

    .venv/bin/python -m bench.bench_image_preprocess [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from trainer.data.image import ImageProcessorConfig, preprocess_images

TARGET_RATIO = 1.5
# (height, width) drawn from: thumbnails, phone and screen shots, large photos, and very wide strips.
SIZES = [
    (64, 64), (224, 224), (300, 400), (480, 640), (640, 480), (720, 1280), (768, 1024),
    (1000, 1500), (1500, 1000), (1080, 1920), (200, 1600), (30, 2000), (900, 300), (512, 512),
]  # fmt: skip

Outputs = tuple[torch.Tensor, torch.Tensor]


def make_images(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(SIZES), count)
    picks[: count // 8] = SIZES.index((1000, 1500))  # make sure the large-image case is well represented
    return [
        Image.fromarray(rng.integers(0, 256, (*SIZES[i], 3), dtype=np.uint8)) for i in rng.permutation(picks)
    ]


def run_pass(fn: Callable[[Image.Image], Outputs], images: list[Image.Image]) -> tuple[float, list[Outputs]]:
    start = time.perf_counter()
    outputs = [fn(image) for image in images]
    return time.perf_counter() - start, outputs


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 images, 2 timed passes")
    parser.add_argument("--reps", type=int, default=None, help="timed passes per implementation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = 16 if args.quick else 64
    reps = args.reps or (2 if args.quick else 5)

    images = make_images(count, args.seed)
    cfg = ImageProcessorConfig()
    hf = Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)

    def ours(image: Image.Image) -> Outputs:
        return preprocess_images([image], cfg)

    def theirs(image: Image.Image) -> Outputs:
        out = hf(images=[image], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    _, ours_out = run_pass(ours, images)
    _, ref_out = run_pass(theirs, images)
    max_diff = max((a[0] - b[0]).abs().max().item() for a, b in zip(ours_out, ref_out, strict=True))
    grids_equal = all(torch.equal(a[1], b[1]) for a, b in zip(ours_out, ref_out, strict=True))
    del ours_out, ref_out

    ours_s, theirs_s = [], []
    for rep in range(reps):
        ours_s.append(run_pass(ours, images)[0])
        theirs_s.append(run_pass(theirs, images)[0])
        timings = f"ours {ours_s[-1]:.2f}s, transformers {theirs_s[-1]:.2f}s"
        print(f"pass {rep + 1}/{reps}: {timings}", file=sys.stderr)
    ours_rate = count / statistics.median(ours_s)
    theirs_rate = count / statistics.median(theirs_s)
    return {
        "images": count,
        "reps": reps,
        "megapixels": round(sum(im.width * im.height for im in images) / 1e6, 1),
        "ours_samples_per_s": round(ours_rate, 2),
        "transformers_samples_per_s": round(theirs_rate, 2),
        "ratio": round(ours_rate / theirs_rate, 2),
        "target_ratio": TARGET_RATIO,
        "max_abs_diff": max_diff,
        "grids_equal": grids_equal,
    }


if __name__ == "__main__":
    print(json.dumps({"bench": "bench_image_preprocess", **main(sys.argv[1:])}), flush=True)
