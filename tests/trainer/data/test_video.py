"""Video preprocessing (reference §11): frame sampling, the per-video token cap, decoding real clips written
with PyAV, frame lists, patch rows and errors."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.data.image import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessorConfig,
    patchify,
    preprocess_image,
)
from trainer.data.video import (
    VideoBudgetError,
    VideoConfig,
    VideoDecodeError,
    VideoMeta,
    VideoPlan,
    decode_frames,
    frames_from_images,
    frames_to_rows,
    load_video_frames,
    plan_sampling,
    preprocess_video,
    probe,
    sample_count,
    video_tokens,
    write_video,
)

FAST = {"preset": "ultrafast", "crf": "12"}
CFG = VideoConfig()


def index_frame(i: int) -> np.ndarray:
    """A 48x64 frame whose left half encodes i % 30 and right half i // 30, eight grey levels apart, so the
    index of a decoded frame can be read back despite lossy coding."""
    frame = np.empty((48, 64, 3), dtype=np.uint8)
    frame[:, :32] = (i % 30) * 8
    frame[:, 32:] = (i // 30) * 8
    return frame


def read_index(frame: np.ndarray) -> int:
    left = frame[8:40, 4:28].mean() / 8
    right = frame[8:40, 36:60].mean() / 8
    return round(right) * 30 + round(left)


@pytest.fixture(scope="module")
def clip30(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip30.mp4"
    write_video(path, (index_frame(i) for i in range(900)), 30, options=FAST)
    return path


def solid_clip(path: Path, frames: int, colour: tuple[int, int, int], fps: float = 30, size=(48, 64)) -> Path:
    write_video(path, (np.full((*size, 3), colour, dtype=np.uint8) for _ in range(frames)), fps, options=FAST)
    return path


def test_30s_clip_at_30fps_samples_60_frames(clip30: Path) -> None:
    meta = probe(clip30)
    assert (meta.frames, meta.fps, meta.height, meta.width) == (900, 30.0, 48, 64)
    assert meta.duration == pytest.approx(30.0)
    plan = plan_sampling(meta, CFG)
    expected = tuple(int(i) for i in np.linspace(0, 899, 60).round())
    assert plan.frame_indices == expected
    # Decoded at native size, every sampled frame is the one the plan asked for.
    native = decode_frames(clip30, VideoPlan(frame_indices=plan.frame_indices, height=48, width=64))
    assert [read_index(f) for f in native] == list(expected)
    rows, grid = preprocess_video(clip30, CFG)
    assert grid == (30, plan.height // 14, plan.width // 14)
    assert rows.shape == (math.prod(grid), 1176) and rows.dtype == np.float32


@pytest.mark.parametrize(
    ("total", "fps", "expected"),
    [
        (900, 30, 60),
        (18000, 30, 768),  # max_frames
        (300, 30, 20),
        (61, 30, 4),  # 4.07 frames: min_frames
        (135, 30, 8),  # 9 frames: round(4.5) is 4 (half to even), as in qwen-vl-utils
        (165, 30, 12),  # 11 frames: round(5.5) is 6
        (500, 59.94, 16),
        (5, 30, 4),  # shorter than min_frames: every frame, floored to even
        (3, 30, 2),
        (1, 30, 2),  # a single frame is used twice, like an image
    ],
)
def test_sample_count(total: int, fps: float, expected: int) -> None:
    assert sample_count(total, fps, CFG) == expected


@pytest.mark.parametrize(("total", "indices"), [(5, (0, 1, 3, 4)), (3, (0, 2)), (1, (0, 0))])
def test_short_clips_end_to_end(tmp_path: Path, total: int, indices: tuple[int, ...]) -> None:
    path = tmp_path / "short.mp4"
    write_video(path, (index_frame(i) for i in range(total)), 30, options=FAST)
    plan = plan_sampling(probe(path), CFG)
    assert plan.frame_indices == indices
    native = decode_frames(path, VideoPlan(frame_indices=indices, height=48, width=64))
    assert [read_index(f) for f in native] == list(indices)
    _, grid = preprocess_video(path, CFG)
    assert grid[0] == len(indices) // 2


def meta(seconds: float, height: int, width: int, fps: float = 30.0, name: str = "clip.mp4") -> VideoMeta:
    return VideoMeta(
        frames=max(1, round(seconds * fps)), fps=fps, height=height, width=width, duration=seconds, name=name
    )


@pytest.mark.parametrize(
    ("cap", "frames", "size", "tokens"),
    [
        (24576, 120, (420, 728), 23400),
        (16384, 120, (336, 616), 15840),
    ],  # reference §11.3's 60 s 720p examples
)
def test_reference_examples(cap: int, frames: int, size: tuple[int, int], tokens: int) -> None:
    cfg = VideoConfig(max_video_tokens=cap)
    plan = plan_sampling(meta(60, 720, 1280), cfg)
    assert (len(plan.frame_indices), (plan.height, plan.width), video_tokens(plan, cfg)) == (
        frames,
        size,
        tokens,
    )


def test_ten_minute_720p_stays_under_16384_tokens() -> None:
    plan = plan_sampling(meta(600, 720, 1280), CFG)
    # qwen-vl-utils would keep 768 frames of 224x420 (46,080 tokens); the floor frame fits 136 groups of two.
    assert video_tokens(plan, CFG) <= 16384
    assert (len(plan.frame_indices), plan.height, plan.width) == (272, 224, 420)
    assert plan.frame_indices[0] == 0 and plan.frame_indices[-1] == 17999


@pytest.mark.parametrize("cap", [16384, 4096, 700])
def test_token_cap_holds_for_any_video(cap: int) -> None:
    cfg = VideoConfig(max_video_tokens=cap)
    sizes = [
        (720, 1280),
        (1080, 1920),
        (48, 64),
        (2160, 3840),
        (100, 2000),
        (1280, 720),
        (30, 5000),
        (97, 53),
    ]
    for seconds in (0.05, 1, 7, 60, 301, 600, 3600):
        for fps in (24, 30, 59.94):
            for h, w in sizes:
                m = meta(seconds, h, w, fps)
                try:
                    plan = plan_sampling(m, cfg)
                except VideoBudgetError as e:
                    assert "clip.mp4" in str(e)
                    continue
                n = len(plan.frame_indices)
                assert video_tokens(plan, cfg) <= cap, (seconds, fps, h, w)
                assert n % 2 == 0 and n >= min(4, max(2, m.frames // 2 * 2))
                assert plan.height % 28 == 0 and plan.width % 28 == 0
                assert plan.frame_indices[0] >= 0 and plan.frame_indices[-1] <= m.frames - 1


def test_budget_error_names_the_video() -> None:
    # The smallest 720p frame is 224x420 (120 tokens); four frames need 240.
    with pytest.raises(VideoBudgetError, match=r"clip\.mp4.*max_video_tokens=200"):
        plan_sampling(meta(10, 720, 1280), VideoConfig(max_video_tokens=200))


def test_real_720p_clip_is_cut_to_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "hd.mp4"
    ramp = np.broadcast_to(np.linspace(0, 255, 1280, dtype=np.uint8)[None, :, None], (720, 1280, 3))
    write_video(path, (np.roll(ramp, 20 * i, axis=1) for i in range(40)), 10, options=FAST)
    plan = plan_sampling(probe(path), CFG)
    rows, grid = preprocess_video(path, CFG)
    assert grid == (4, plan.height // 14, plan.width // 14) and rows.shape[0] == math.prod(grid)
    # 8 frames at 2 fps would not fit 240 tokens; two groups of the 224x420 floor frame do.
    cfg = VideoConfig(max_video_tokens=240)
    rows, grid = preprocess_video(path, cfg)
    assert grid == (2, 16, 30) and grid[0] * grid[1] * grid[2] // 4 <= 240
    assert plan_sampling(probe(path), cfg).frame_indices == (0, 13, 26, 39)


def test_frames_to_rows_matches_patchify_and_the_image_path() -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    rows, grid = frames_to_rows(frames, CFG)
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    normalised = ((frames / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
    expected, expected_grid = patchify(normalised, ImageProcessorConfig())
    assert grid == expected_grid == (2, 4, 6)
    np.testing.assert_allclose(rows, expected, rtol=0, atol=1e-6)
    # A still image is two identical frames: the same rows, bit for bit, as the image preprocessing gives.
    still = np.stack([frames[0], frames[0]])
    image_rows, image_grid = preprocess_image(
        Image.fromarray(frames[0]), ImageProcessorConfig(), min_pixels=0
    )
    assert image_grid == (1, 4, 6)
    np.testing.assert_array_equal(frames_to_rows(still, CFG)[0], image_rows)


def test_static_colour_clip_normalises_to_expected_values(tmp_path: Path) -> None:
    colour = (200, 100, 50)
    rows, grid = preprocess_video(solid_clip(tmp_path / "solid.mp4", 20, colour, fps=10), CFG)
    per_channel = rows.reshape(-1, 3, 2 * 14 * 14)
    for c in range(3):
        expected = (colour[c] / 255 - OPENAI_CLIP_MEAN[c]) / OPENAI_CLIP_STD[c]
        # yuv420p round trip: a few 8-bit levels at most on a flat colour.
        tolerance = 4 / 255 / OPENAI_CLIP_STD[c]
        assert np.abs(per_channel[:, c] - expected).max() < tolerance


def test_sources_path_bytes_and_file_objects_agree(clip30: Path) -> None:
    by_path = load_video_frames(clip30, CFG)
    data = clip30.read_bytes()
    with open(clip30, "rb") as file:
        file.read(100)  # a file object is read from its start wherever it stands
        for source in (data, io.BytesIO(data), file):
            np.testing.assert_array_equal(load_video_frames(source, CFG), by_path)


def test_frame_list_is_padded_by_repeating_the_last_frame(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [Image.new("RGB", (84, 56), c) for c in colours]
    frames = frames_from_images(images, CFG)
    assert frames.shape[0] == 4
    np.testing.assert_array_equal(frames[3], frames[2])
    assert [tuple(int(v) for v in f[10, 10]) for f in frames] == [*colours, colours[2]]
    # Paths give the same frames; a frame of another size is resized to the first frame's planned size.
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, image in zip(paths, [*images[:2], Image.new("RGB", (40, 90), colours[2])], strict=True):
        image.save(path)
    from_paths = frames_from_images(paths, CFG)
    assert from_paths.shape == frames.shape
    np.testing.assert_array_equal(from_paths[:2], frames[:2])
    assert tuple(int(v) for v in from_paths[3, 10, 10]) == colours[2]
    rows, grid = preprocess_video(paths, CFG)
    assert grid == (2, frames.shape[1] // 14, frames.shape[2] // 14) and rows.shape[0] == math.prod(grid)


def test_long_frame_list_is_thinned_to_the_cap() -> None:
    images = [Image.new("RGB", (1280, 720), (i, i, i)) for i in range(12)]
    frames = frames_from_images(images, VideoConfig(max_video_tokens=480))
    # Four groups of the 120-token floor frame fit: 8 of the 12 frames, spread over the list.
    assert frames.shape == (8, 224, 420, 3)
    assert [int(f[0, 0, 0]) for f in frames] == [int(i) for i in np.linspace(0, 11, 8).round()]


def test_missing_and_undecodable_files_name_the_file(tmp_path: Path, clip30: Path) -> None:
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoDecodeError, match="missing.mp4"):
        preprocess_video(missing, CFG)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="garbage.mp4"):
        preprocess_video(garbage, CFG)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip30.read_bytes()[: clip30.stat().st_size // 2])
    with pytest.raises(VideoDecodeError, match="truncated.mp4"):
        preprocess_video(truncated, CFG)
    with pytest.raises(VideoDecodeError, match="bytes"):
        probe(b"not a video at all")
    assert issubclass(VideoDecodeError, ValueError)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fps": 0}, "fps"),
        ({"frame_factor": 3}, "frame_factor"),
        ({"min_frames": 0}, "min_frames"),
        ({"min_frames": 10, "max_frames": 8}, "max_frames"),
        ({"min_pixels": 700_000}, "min_pixels"),
        ({"max_pixels": 100}, "max_pixels"),
        ({"max_video_tokens": 0}, "max_video_tokens"),
        ({"decode_threads": -1}, "decode_threads"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        VideoConfig(**kwargs)


def test_write_video_rejects_odd_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="frames"):
        write_video(tmp_path / "odd.mp4", [np.zeros((47, 64, 3), dtype=np.uint8)], 30)


def test_stream_shorter_than_its_header_repeats_the_last_frame(tmp_path: Path) -> None:
    path = tmp_path / "five.mp4"
    write_video(path, (index_frame(i) for i in range(5)), 30, options=FAST)
    frames = decode_frames(path, VideoPlan(frame_indices=(0, 3, 7, 9), height=48, width=64))
    assert [read_index(f) for f in frames] == [0, 3, 3, 3]
    with pytest.raises(VideoDecodeError, match="five.mp4"):
        decode_frames(path, VideoPlan(frame_indices=(6, 8), height=48, width=64))


def test_container_without_a_frame_count_is_counted(tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"  # Matroska stores no frame count: probe counts packets instead
    write_video(path, (index_frame(i) for i in range(45)), 30, options=FAST)
    m = probe(path)
    assert (m.frames, m.fps, m.duration) == (45, 30.0, pytest.approx(1.5))
    native = decode_frames(
        path, VideoPlan(frame_indices=plan_sampling(m, CFG).frame_indices, height=48, width=64)
    )
    assert [read_index(f) for f in native] == [0, 15, 29, 44]


class _Pipe(io.RawIOBase):
    """A non-seekable stream, like a socket or an HTTP response body."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # noqa: ANN001 - memoryview or bytearray
        return self._data.readinto(buffer)


def test_non_seekable_stream_is_read_whole(clip30: Path) -> None:
    frames = load_video_frames(_Pipe(clip30.read_bytes()), CFG)
    np.testing.assert_array_equal(frames, load_video_frames(clip30, CFG))
