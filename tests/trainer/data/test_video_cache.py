"""Decoded-video cache: hits and misses, LRU eviction, atomic writes, corruption, several real processes, and
its use by preprocess_video."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from trainer.data.video_cache import CacheKey, VideoCache, VideoCacheConfig

ENTRY_FRAMES = (4, 32, 32, 3)  # 12,288 bytes of frames per entry


def key(name: str, version: str = "v1") -> CacheKey:
    return CacheKey(uri=f"s3://bucket/{name}.mp4", version=version, params="fps=2")


def frames_for(name: str, shape: tuple[int, ...] = ENTRY_FRAMES) -> np.ndarray:
    """Frames whose content depends only on the name, so any process can check what it read."""
    seed = int.from_bytes(name.encode(), "little") % 2**32
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_cache(root: Path, entries: float = 100) -> VideoCache:
    return VideoCache(VideoCacheConfig(root=root, max_bytes=int(entries * entry_size(root))))


def entry_size(root: Path) -> int:
    probe = VideoCache(VideoCacheConfig(root=root / "probe", max_bytes=10**9))
    probe.put(key("a"), frames_for("a"))
    return probe.path(key("a")).stat().st_size


def test_put_then_get_counts_a_miss_then_a_hit(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c")
    assert cache.get(key("a")) is None
    assert cache.put(key("a"), frames_for("a"), info={"frame_indices": [0, 1, 2, 3]})
    got = cache.get(key("a"))
    assert got is not None and got.shape == ENTRY_FRAMES
    np.testing.assert_array_equal(got, frames_for("a"))
    assert cache.stats() == {
        "hits": 1, "misses": 1, "puts": 1, "evictions": 0, "corrupt": 0, "skipped": 0, "errors": 0,
    }  # fmt: skip


def test_every_part_of_the_key_matters(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c")
    cache.put(key("a"), frames_for("a"))
    assert cache.get(key("a", version="v2")) is None
    assert cache.get(CacheKey(uri=key("a").uri, version="v1", params="fps=1")) is None
    assert cache.get(key("b")) is None
    assert cache.stats()["misses"] == 3


def test_least_recently_used_entry_is_evicted_first(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c", entries=3.5)
    for name in "abc":
        cache.put(key(name), frames_for(name))
    assert cache.get(key("a")) is not None  # a is now the most recently used
    cache.put(key("d"), frames_for("d"))
    # Checked by path, not get(): a hit would itself make the entry most recently used.
    assert [cache.path(key(name)).exists() for name in "abcd"] == [True, False, True, True]
    cache.put(key("e"), frames_for("e"))  # c is the oldest now: a was read and d written after it
    assert [cache.path(key(name)).exists() for name in "acde"] == [True, False, True, True]
    assert cache.stats()["evictions"] == 2
    assert cache.total_bytes() <= cache.config.max_bytes


def test_entry_larger_than_the_cache_is_not_stored(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c", entries=1.5)
    assert not cache.put(key("big"), frames_for("big", (8, 64, 64, 3)))
    assert cache.get(key("big")) is None
    assert cache.stats()["skipped"] == 1 and cache.total_bytes() == 0


def test_partial_temp_file_is_never_read_and_stale_ones_are_removed(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "c")
    # What a writer killed mid-write leaves: a temp file beside where the entry would go.
    full = tmp_path / "full"
    make_cache(full).put(key("a"), frames_for("a"))
    data = next(full.glob("*.frames")).read_bytes()
    stale = cache.path(key("a")).with_suffix(".123.deadbeef.tmp")
    stale.write_bytes(data[: len(data) // 2])
    fresh = cache.path(key("b")).with_suffix(".456.cafef00d.tmp")
    fresh.write_bytes(data[:100])
    assert cache.get(key("a")) is None
    hour_ago = time.time_ns() - 2 * 3600 * 10**9
    os.utime(stale, ns=(hour_ago, hour_ago))
    cache.evict()
    assert not stale.exists() and fresh.exists()  # a writer may still be busy with the fresh one


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "extend"])
def test_corrupt_entry_is_a_miss_and_is_removed(tmp_path: Path, damage: str) -> None:
    cache = make_cache(tmp_path / "c")
    cache.put(key("a"), frames_for("a"))
    path = cache.path(key("a"))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-1000]
    elif damage == "flip_payload":
        data[-5] ^= 0x10
    elif damage == "flip_header":
        data[0] ^= 0x01
    else:
        data += b"\0" * 10
    path.write_bytes(bytes(data))
    assert cache.get(key("a")) is None
    assert not path.exists()
    assert cache.stats()["corrupt"] == 1 and cache.stats()["misses"] == 1
    cache.put(key("a"), frames_for("a"))  # and the entry can be stored again
    np.testing.assert_array_equal(cache.get(key("a")), frames_for("a"))


def _write_forever(root: str, first: int) -> None:
    cache = VideoCache(VideoCacheConfig(root=root, max_bytes=10**9))
    for i in range(10**9):
        name = f"k{first + i % 5}"
        cache.put(key(name), frames_for(name, BIG))


BIG = (16, 128, 128, 3)  # 786 KB: long enough to write that a kill often lands mid-write


@pytest.mark.multiproc
def test_writer_killed_mid_write_leaves_only_whole_entries(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cache = VideoCache(VideoCacheConfig(root=root, max_bytes=10**9))
    ctx = mp.get_context("spawn")
    for attempt in range(3):
        first = 5 * attempt
        writer = ctx.Process(target=_write_forever, args=(str(root), first))
        writer.start()
        deadline = time.monotonic() + 30
        while not cache.path(key(f"k{first}")).exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.003 * attempt)  # kill at a few different points of the write loop
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
    found = {f"k{i}": cache.get(key(f"k{i}")) for i in range(15)}
    assert all(found[f"k{5 * attempt}"] is not None for attempt in range(3))
    for name, frames in found.items():
        if frames is not None:
            np.testing.assert_array_equal(frames, frames_for(name, BIG))
    assert cache.stats()["corrupt"] == 0


def _hammer(root: str, max_bytes: int, seed: int, results: mp.Queue) -> None:
    cache = VideoCache(VideoCacheConfig(root=root, max_bytes=max_bytes))
    rng = np.random.default_rng(seed)
    wrong = 0
    for _ in range(80):
        name = f"k{rng.integers(6)}"
        frames = cache.get(key(name))
        if frames is None:
            cache.put(key(name), frames_for(name))
        elif not np.array_equal(frames, frames_for(name)):
            wrong += 1
    results.put({"wrong": wrong, **cache.stats()})


@pytest.mark.multiproc
def test_several_processes_share_one_cache(tmp_path: Path) -> None:
    root = tmp_path / "c"
    max_bytes = int(3.5 * entry_size(tmp_path))  # 6 keys, room for 3: evictions race with reads and writes
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=_hammer, args=(str(root), max_bytes, seed, results)) for seed in range(4)]
    for w in workers:
        w.start()
    stats = [results.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    assert sum(s["wrong"] for s in stats) == 0
    assert sum(s["corrupt"] for s in stats) == 0 and sum(s["errors"] for s in stats) == 0
    assert sum(s["hits"] for s in stats) > 0 and sum(s["evictions"] for s in stats) > 0
    assert sum(s["hits"] + s["misses"] for s in stats) == 4 * 80
    cache = VideoCache(VideoCacheConfig(root=root, max_bytes=max_bytes))
    assert cache.total_bytes() <= max_bytes
    assert not list(root.glob("*.tmp"))


def test_preprocess_video_uses_the_cache(tmp_path: Path) -> None:
    # Imported here, not at the top: the spawned workers above import this module, and trainer.data.video
    # pulls in torch (through trainer.data.image), two seconds per process.
    from trainer.data.video import VideoConfig, load_video_frames, preprocess_video, write_video

    path = tmp_path / "clip.mp4"
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None]
    write_video(path, (np.broadcast_to(np.roll(ramp, i, axis=1), (48, 64, 3)) for i in range(60)), 30)
    cfg = VideoConfig()
    cache = VideoCache(VideoCacheConfig(root=tmp_path / "c", max_bytes=10**9))
    uncached = preprocess_video(path, cfg)
    cold = preprocess_video(path, cfg, cache=cache)
    warm = preprocess_video(path, cfg, cache=cache)
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 1 and cache.stats()["puts"] == 1
    for rows, grid in (cold, warm):
        assert grid == uncached[1]
        np.testing.assert_array_equal(rows, uncached[0])
    # New content at the same path (another size and mtime) is a new version: a miss, not stale frames.
    write_video(path, (np.full((48, 64, 3), 128, dtype=np.uint8) for _ in range(30)), 30)
    load_video_frames(path, cfg, cache=cache)
    assert cache.stats()["misses"] == 2
    # Bytes from object storage are keyed by the URI and ETag the caller gives.
    data = path.read_bytes()
    with pytest.raises(ValueError, match="uri and version"):
        load_video_frames(data, cfg, cache=cache)
    load_video_frames(data, cfg, cache=cache, uri="s3://b/clip.mp4", version='"etag1"')
    load_video_frames(data, cfg, cache=cache, uri="s3://b/clip.mp4", version='"etag1"')
    assert cache.stats()["hits"] == 2


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        VideoCacheConfig(root=tmp_path, max_bytes=0)
    with pytest.raises(ValueError, match="root"):
        VideoCacheConfig(root="", max_bytes=10)
