"""Claim: a warm decoded-video cache serves sampled frames >= 10x faster than decoding them with PyAV.

Clips: short synthetic videos (default 8 clips of 10 s, 640x360, 30 fps, H.264 yuv420p from write_video)
of a smooth textured scene panning with light noise, generated into a temp dir. Each pass times, per clip and
single-threaded as a loader worker would run:

* direct: `load_video_frames` without a cache: probe, plan, decode at 2 fps, resize (the baseline);
* cold: the same through a new, empty `VideoCache` (decode plus checksum, fsync and rename of the entry);
* warm: the same again, all hits: read, size and CRC check;
* warm_disk: hits again after asking the kernel to drop the entries from the page cache (posix_fadvise
  DONTNEED), so the read comes from the disk;
* end to end: `preprocess_video` (frames plus normalise and patchify) direct and warm, for the whole saving.

`ratio` is warm vs direct; the median of the passes counts.

    .venv/bin/python -m bench.bench_video_cache [--quick] [--reps N] [--clips N] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.data.video import VideoConfig, load_video_frames, preprocess_video, write_video
from trainer.data.video_cache import VideoCache, VideoCacheConfig

TARGET_RATIO = 10.0
HEIGHT, WIDTH, FPS = 360, 640, 30


def scene(seed: int, frames: int) -> Iterator[np.ndarray]:
    """A smooth random landscape panning right, with a little per-frame noise, like camera footage."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 40, 3), dtype=np.uint8))
    wide = np.asarray(coarse.resize((WIDTH + 2 * frames, HEIGHT), Image.Resampling.BICUBIC))
    noise = rng.integers(-6, 7, (7, HEIGHT, WIDTH, 3), dtype=np.int16)  # a few noise fields, cycled: cheap
    for i in range(frames):
        yield np.clip(wide[:, 2 * i : 2 * i + WIDTH] + noise[i % len(noise)], 0, 255).astype(np.uint8)


def timed(fn: Callable[[Path], object], clips: list[Path]) -> float:
    start = time.perf_counter()
    for clip in clips:
        fn(clip)
    return time.perf_counter() - start


def drop_page_cache(root: Path) -> None:
    for entry in root.glob("*.frames"):
        fd = os.open(entry, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 clips of 5 s, 2 passes")
    parser.add_argument("--reps", type=int, default=None, help="timed passes")
    parser.add_argument("--clips", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args(argv)
    count = args.clips or (3 if args.quick else 8)
    seconds = args.seconds or (5.0 if args.quick else 10.0)
    reps = args.reps or (2 if args.quick else 3)
    cfg = VideoConfig()

    with tempfile.TemporaryDirectory(prefix="bench_video_cache_") as tmp:
        work = Path(tmp)
        clips = [work / f"clip{i}.mp4" for i in range(count)]
        start = time.perf_counter()
        for i, clip in enumerate(clips):
            write_video(clip, scene(i, round(seconds * FPS)), FPS)
        print(f"wrote {count} clips in {time.perf_counter() - start:.1f}s", file=sys.stderr)

        times: dict[str, list[float]] = {
            k: [] for k in ("direct", "cold", "warm", "warm_disk", "e2e_direct", "e2e_warm")
        }
        for rep in range(reps):
            cache = VideoCache(VideoCacheConfig(root=work / f"cache{rep}", max_bytes=4 * 2**30))
            times["direct"].append(timed(lambda c: load_video_frames(c, cfg), clips))
            times["cold"].append(timed(lambda c, cache=cache: load_video_frames(c, cfg, cache=cache), clips))
            times["warm"].append(timed(lambda c, cache=cache: load_video_frames(c, cfg, cache=cache), clips))
            drop_page_cache(cache.root)
            times["warm_disk"].append(
                timed(lambda c, cache=cache: load_video_frames(c, cfg, cache=cache), clips)
            )
            times["e2e_direct"].append(timed(lambda c: preprocess_video(c, cfg), clips))
            times["e2e_warm"].append(
                timed(lambda c, cache=cache: preprocess_video(c, cfg, cache=cache), clips)
            )
            stats = cache.stats()
            assert stats["misses"] == count and stats["hits"] == 3 * count, stats
            print(
                f"pass {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()),
                file=sys.stderr,
            )
        frames = load_video_frames(clips[0], cfg)
        cache_bytes = cache.total_bytes()

    rate = {k: count / statistics.median(v) for k, v in times.items()}
    return {
        "clips": count,
        "seconds_per_clip": seconds,
        "frames_per_clip": list(frames.shape),
        "reps": reps,
        "direct_samples_per_s": round(rate["direct"], 2),
        "cold_samples_per_s": round(rate["cold"], 2),
        "warm_samples_per_s": round(rate["warm"], 2),
        "warm_disk_samples_per_s": round(rate["warm_disk"], 2),
        "ratio": round(rate["warm"] / rate["direct"], 2),
        "warm_vs_cold": round(rate["warm"] / rate["cold"], 2),
        "warm_disk_vs_direct": round(rate["warm_disk"] / rate["direct"], 2),
        "e2e_direct_samples_per_s": round(rate["e2e_direct"], 2),
        "e2e_warm_samples_per_s": round(rate["e2e_warm"], 2),
        "e2e_ratio": round(rate["e2e_warm"] / rate["e2e_direct"], 2),
        "target_ratio": TARGET_RATIO,
        "cache_mb": round(cache_bytes / 2**20, 1),
    }


if __name__ == "__main__":
    print(json.dumps({"bench": "bench_video_cache", **main(sys.argv[1:])}), flush=True)
