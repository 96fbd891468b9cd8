"""Qwen2-VL video preprocessing: probe and decode with PyAV, sample at 2 fps, size the frames so the video
stays under a per-video token cap, normalise and cut into the same merge-ordered patch rows as images.

Output contract: `pixel_values_videos` rows (t*h*w, 3*2*14*14) float32 laid out exactly like images' (see
trainer/data/image.py), and `video_grid_thw` (n/2, H/14, W/14); the LLM sees n/2 * H/28 * W/28 video tokens.

Decisions:

* Frame count (reference §11.2, qwen-vl-utils 0.0.8): n = frames / video_fps * fps, clamped to
  [ceil2(min_frames), floor2(min(max_frames, frames))] and rounded half-to-even to a multiple of frame_factor;
  indices round(linspace(0, frames - 1, n)). A clip shorter than min_frames gives all its frames floored to an
  even count (5 frames give 0, 1, 3, 4); a one-frame clip gives that frame twice, as an image would be.
* Token cap. Each group of temporal_patch_size frames gets max_video_tokens * 28^2 / t pixels, at most
  max_pixels, as qwen-vl-utils' total_pixels / n * 2. qwen-vl-utils then floors that budget at min_pixels, so
  long videos overflow (600 s of 720p: 46,080 tokens). We keep the min_pixels floor but drop frames instead:
  the "floor frame" is the frame resized to a min_pixels budget, and n is lowered to the largest multiple of
  frame_factor whose groups of floor frames fit the cap, the indices spread over the whole clip again (600 s
  of 720p: 272 frames of 224x420, 16,320 tokens). If even min_frames (or all of a short clip) cannot fit,
  VideoBudgetError names the video. smart_resize can overshoot its budget (rounding up to min_pixels, the
  one-merge-window clamp of very thin frames), so the result is checked and falls back to the floor frame.
* Decoding is sequential: frame indices counted from the decoder are exact even for variable frame rate
  streams, where seeking by timestamp would have to guess, and at 2 fps the gap between wanted frames is far
  shorter than a typical GOP (x264: 250 frames), so a seek would land on the same keyframe anyway. Only the
  wanted frames are converted to RGB, and decoding stops after the last one. If the stream ends before the
  frame count its header claimed, the missing tail repeats the last decoded frame. Rotation metadata (phone
  videos) is not applied.
* Resize: PIL bicubic on the uint8 RGB frame (RGB from FFmpeg's swscale, as torchvision's PyAV reader gets
  it). The reference (qwen-vl-utils) uses torchvision's antialiased bicubic, which is modelled on PIL's: the
  same separable a = -0.5 cubic with its support widened by the downscale factor. They differ in rounding
  (PIL rounds to uint8 between its two passes), by about one 8-bit level; not measured here, as torchvision
  cannot be installed in this environment. Keeping uint8 is also what makes decoded frames cheap to cache.
* A list of frame images (paths, bytes or PIL) is one video: all frames are kept, padded to an even count by
  repeating the last one, each resized to the size planned from the first frame (qwen-vl-utils would fail to
  stack frames of different sizes); the token cap applies as above. Lists are not cached.
* Errors: a missing, unreadable or undecodable video raises VideoDecodeError (a ValueError) naming it, so the
  loader can skip the sample.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np
from PIL import Image

from trainer.data.image import (
    ImageProcessorConfig,
    ImageSource,
    _fused_affine,
    _merge_window_view,
    _require_int,
    load_image,
    smart_resize,
)
from trainer.data.video_cache import CacheKey, VideoCache

VideoSource = str | os.PathLike[str] | bytes | BinaryIO

# Part of every cache key: bump it whenever planning or decoding would give other frames for the same config.
PLAN_VERSION = 1
# Rows per multiply-add chunk: 128 rows x 1176 float32 is ~600 KB, small enough to stay in L2.
_CHUNK_ROWS = 128


class VideoDecodeError(ValueError):
    """A video could not be opened, probed or decoded; the message names it."""


class VideoBudgetError(ValueError):
    """A video cannot keep even its minimum frames under max_video_tokens; the message names it."""


@dataclass(kw_only=True, slots=True)
class VideoConfig:
    """Sampling and sizing settings (reference §11.1); `image` supplies the patch geometry and normalisation
    (its own min/max_pixels are for images and are not used here)."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    frame_factor: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    max_video_tokens: int = 16384
    decode_threads: int = 1  # FFmpeg decoder threads; 1 suits many loader processes, 0 lets FFmpeg choose
    image: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.image, ImageProcessorConfig):
            raise ValueError(f"image must be an ImageProcessorConfig, got {self.image!r}")
        if isinstance(self.fps, bool) or not isinstance(self.fps, int | float) or not 0 < self.fps < math.inf:
            raise ValueError(f"fps must be a finite number > 0, got {self.fps!r}")
        _require_int("frame_factor", self.frame_factor, minimum=1)
        if self.frame_factor % self.image.temporal_patch_size:
            raise ValueError(
                f"frame_factor ({self.frame_factor}) must be a multiple of image.temporal_patch_size "
                f"({self.image.temporal_patch_size})"
            )
        _require_int("min_frames", self.min_frames, minimum=1)
        _require_int("max_frames", self.max_frames, minimum=1)
        if _ceil_by(self.min_frames, self.frame_factor) > _floor_by(self.max_frames, self.frame_factor):
            raise ValueError(
                f"max_frames ({self.max_frames}) leaves no multiple of frame_factor ({self.frame_factor}) "
                f"at or above min_frames ({self.min_frames})"
            )
        _require_int("min_pixels", self.min_pixels, minimum=0)
        _require_int("max_pixels", self.max_pixels, minimum=self.image.factor**2)
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        _require_int("max_video_tokens", self.max_video_tokens, minimum=1)
        _require_int("decode_threads", self.decode_threads, minimum=0)


@dataclass(kw_only=True, slots=True)
class VideoMeta:
    """What planning needs to know about a video, from its container headers."""

    frames: int
    fps: float
    height: int
    width: int
    duration: float  # seconds
    name: str = "<video>"

    def __post_init__(self) -> None:
        for attr in ("frames", "height", "width"):
            _require_int(attr, getattr(self, attr), minimum=1)
        if not 0 < self.fps < math.inf:
            raise ValueError(f"fps must be a finite number > 0, got {self.fps!r}")


@dataclass(kw_only=True, slots=True)
class VideoPlan:
    """Which frames to decode (sorted, repeats allowed) and the size to resize them to."""

    frame_indices: tuple[int, ...]
    height: int
    width: int

    def __post_init__(self) -> None:
        if (
            not self.frame_indices
            or min(self.frame_indices) < 0
            or list(self.frame_indices) != sorted(self.frame_indices)
        ):
            raise ValueError(f"frame_indices must be non-empty, sorted and >= 0, got {self.frame_indices!r}")
        _require_int("height", self.height, minimum=1)
        _require_int("width", self.width, minimum=1)


def _ceil_by(value: int, factor: int) -> int:
    return -(-value // factor) * factor


def _floor_by(value: int, factor: int) -> int:
    return value // factor * factor


def sample_count(total_frames: int, video_fps: float, cfg: VideoConfig) -> int:
    """Frames to sample from a clip before the token cap (reference §11.2)."""
    ff = cfg.frame_factor
    upper = max(ff, _floor_by(min(cfg.max_frames, total_frames), ff))
    lower = min(_ceil_by(cfg.min_frames, ff), upper)
    wanted = min(max(total_frames / video_fps * cfg.fps, lower), upper)
    return round(wanted / ff) * ff


def video_tokens(plan: VideoPlan, cfg: VideoConfig) -> int:
    """LLM tokens of a planned video: n / temporal_patch_size * H/28 * W/28."""
    f = cfg.image.factor
    return len(plan.frame_indices) // cfg.image.temporal_patch_size * (plan.height // f) * (plan.width // f)


def _fit(meta: VideoMeta, cfg: VideoConfig, count: int) -> tuple[int, int, int]:
    """Lower `count` frames as needed and size them so the video fits max_video_tokens: (n, height, width)."""
    f, tp, cap = cfg.image.factor, cfg.image.temporal_patch_size, cfg.max_video_tokens
    try:
        floor_h, floor_w = smart_resize(
            meta.height, meta.width, f, cfg.min_pixels, max(cfg.min_pixels, f * f)
        )
    except ValueError as e:
        raise VideoBudgetError(f"video {meta.name}: {e}") from None
    floor_tokens = (floor_h // f) * (floor_w // f)
    fitting = _floor_by(cap // floor_tokens * tp, cfg.frame_factor)
    keep = min(_ceil_by(cfg.min_frames, cfg.frame_factor), count)
    if fitting < keep:
        raise VideoBudgetError(
            f"video {meta.name}: {keep} frames at the smallest size {floor_h}x{floor_w} "
            f"({floor_tokens} tokens per {tp} frames) exceed max_video_tokens={cap}"
        )
    n = min(count, fitting)
    groups = n // tp
    budget = min(cfg.max_pixels, max(cfg.min_pixels, cap * f * f / groups))
    height, width = smart_resize(meta.height, meta.width, f, cfg.min_pixels, budget)
    if groups * (height // f) * (width // f) > cap:
        height, width = floor_h, floor_w
    return n, height, width


def _spread(total: int, n: int) -> tuple[int, ...]:
    return tuple(int(i) for i in np.linspace(0, total - 1, n).round())


def plan_sampling(meta: VideoMeta, cfg: VideoConfig) -> VideoPlan:
    """Frames to sample at cfg.fps and their size, within cfg.max_video_tokens (see the module docstring)."""
    n, height, width = _fit(meta, cfg, sample_count(meta.frames, meta.fps, cfg))
    return VideoPlan(frame_indices=_spread(meta.frames, n), height=height, width=width)


def _source_name(source: VideoSource) -> str:
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return str(getattr(source, "name", None) or f"<{type(source).__name__} object>")


@contextmanager
def _opened(source: VideoSource, name: str) -> Iterator[av.container.InputContainer]:
    """Open a video for reading, turning every failure inside the block into VideoDecodeError."""
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            file: str | BinaryIO = io.BytesIO(source)
        elif isinstance(source, str | os.PathLike):
            file = os.fspath(source)
        elif source.seekable():
            source.seek(0)  # a file object is always read from its start, so probe and decode see the same
            file = source
        else:
            file = io.BytesIO(source.read())  # containers such as mp4 need to seek
        with av.open(file, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"no video stream in {name}")
            yield container
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, RuntimeError) as e:
        raise VideoDecodeError(f"cannot decode video {name}: {e}") from e


def probe(source: VideoSource) -> VideoMeta:
    """Read frame count, frame rate and size from the container, counting packets when no count is stored."""
    name = _source_name(source)
    with _opened(source, name) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / av.time_base
        frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        fps = float(rate) if rate else (frames / duration if duration > 0 else 0.0)
        height, width = stream.codec_context.height, stream.codec_context.width
    if frames < 1 or not fps > 0 or height < 1 or width < 1:
        raise VideoDecodeError(
            f"video {name} has no usable frames ({frames} frames, {fps} fps, {width}x{height})"
        )
    return VideoMeta(frames=frames, fps=fps, height=height, width=width, duration=duration, name=name)


def decode_frames(source: VideoSource, plan: VideoPlan, *, threads: int = 1) -> np.ndarray:
    """Decode the planned frames, resized: uint8 (n, height, width, 3)."""
    name = _source_name(source)
    indices = plan.frame_indices
    out = np.empty((len(indices), plan.height, plan.width, 3), dtype=np.uint8)
    done = 0
    with _opened(source, name) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if indices[done] != index:
                continue
            image = frame.to_image()
            if image.size != (plan.width, plan.height):
                image = image.resize((plan.width, plan.height), Image.Resampling.BICUBIC)
            out[done] = np.asarray(image)
            done += 1
            while done < len(indices) and indices[done] == index:
                out[done] = out[done - 1]
                done += 1
            if done == len(indices):
                break
    if done == 0:
        raise VideoDecodeError(f"no frames decoded from video {name}")
    out[done:] = out[done - 1]
    return out


def frames_to_rows(frames: np.ndarray, cfg: VideoConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalise uint8 frames (n, H, W, 3) into pixel_values rows and return them with the grid (t, h, w).

    The same rows as image.patchify on the normalised float frames, built like image.py's fast path: the patch
    shuffle runs on uint8, then each cache-sized chunk of rows is converted, scaled and shifted in place."""
    img = cfg.image
    tp, p = img.temporal_patch_size, img.patch_size
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be uint8 (n, H, W, 3), got {frames.dtype} {frames.shape}")
    n, h, w, _ = frames.shape
    if n == 0 or n % tp or h % img.factor or w % img.factor:
        raise ValueError(
            f"frames need a multiple of {tp} frames with sides multiple of {img.factor}, got {frames.shape}"
        )
    grid = (n // tp, h // p, w // p)
    groups = frames.transpose(0, 3, 1, 2).reshape(grid[0], tp, 3, h, w)
    patches = np.ascontiguousarray(_merge_window_view(groups, img)).reshape(-1, 3, tp * p * p)
    out = np.empty((len(patches), img.patch_dim), dtype=np.float32)
    rows = out.reshape(patches.shape)
    scale, offset = _fused_affine(img)
    for start in range(0, len(patches), _CHUNK_ROWS):
        dst = rows[start : start + _CHUNK_ROWS]
        # A plain uint8 -> float32 copy then in-place float ops is about twice as fast as one mixed-type
        # multiply, and gives the same values: every step is the same float32 operation.
        np.copyto(dst, patches[start : start + _CHUNK_ROWS])
        dst *= scale
        dst += offset
    return out, grid


def cache_key(uri: str, version: str, cfg: VideoConfig) -> CacheKey:
    """Key of a video's sampled frames: its URI, content version and every setting that shapes the plan."""
    settings = (
        f"plan=v{PLAN_VERSION} fps={float(cfg.fps)!r} "
        f"frames={cfg.min_frames}..{cfg.max_frames}/{cfg.frame_factor} "
        f"pixels={cfg.min_pixels}..{cfg.max_pixels} tokens={cfg.max_video_tokens} "
        f"patch={cfg.image.patch_size}x{cfg.image.merge_size}x{cfg.image.temporal_patch_size}"
    )
    return CacheKey(uri=uri, version=version, params=settings)


def local_version(path: str | os.PathLike[str]) -> str:
    """Content version of a local file for cache keys: modification time and size."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise VideoDecodeError(f"cannot read video {os.fspath(path)}: {e}") from e
    return f"mtime_ns={st.st_mtime_ns} size={st.st_size}"


def load_video_frames(
    source: VideoSource,
    cfg: VideoConfig,
    *,
    cache: VideoCache | None = None,
    uri: str | None = None,
    version: str | None = None,
) -> np.ndarray:
    """Sampled, resized uint8 frames (n, H, W, 3) of a video, from `cache` when it has them.

    A local path is keyed by its absolute path and local_version unless `uri`/`version` are given; bytes and
    file objects need both to be cached."""
    key = None
    if cache is not None:
        if isinstance(source, str | os.PathLike):
            uri = uri or os.path.abspath(source)
            version = version or local_version(source)
        if not uri or not version:
            raise ValueError(f"uri and version are required to cache video {_source_name(source)}")
        key = cache_key(uri, version, cfg)
        frames = cache.get(key)
        if frames is not None:
            return frames
    if not isinstance(source, bytes | bytearray | memoryview | str | os.PathLike) and not source.seekable():
        source = source.read()  # probe and decode both read the video: a one-pass stream must be kept
    plan = plan_sampling(probe(source), cfg)
    frames = decode_frames(source, plan, threads=cfg.decode_threads)
    if cache is not None and key is not None:
        cache.put(key, frames, info={"frame_indices": list(plan.frame_indices)})
    return frames


def frames_from_images(images: Sequence[ImageSource], cfg: VideoConfig) -> np.ndarray:
    """A video given as frame images: uint8 (n, H, W, 3), padded to frame_factor and sized under the cap."""
    if not images:
        raise ValueError("video frame list is empty")
    rgbs = [load_image(image) for image in images]
    meta = VideoMeta(
        frames=len(rgbs),
        fps=cfg.fps,
        height=rgbs[0].height,
        width=rgbs[0].width,
        duration=len(rgbs) / cfg.fps,
        name=f"<list of {len(rgbs)} frames>",
    )
    padded = _ceil_by(len(rgbs), cfg.frame_factor)
    n, height, width = _fit(meta, cfg, padded)
    picks = (
        [*range(len(rgbs)), *[len(rgbs) - 1] * (padded - len(rgbs))] if n == padded else _spread(len(rgbs), n)
    )
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for i, pick in enumerate(picks):
        image = rgbs[pick]
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        out[i] = np.asarray(image)
    return out


def preprocess_video(
    source: VideoSource | Sequence[ImageSource],
    cfg: VideoConfig,
    *,
    cache: VideoCache | None = None,
    uri: str | None = None,
    version: str | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A video (path, bytes, file object or list of frame images) to (pixel rows float32, grid (t, h, w))."""
    if isinstance(source, list | tuple):
        frames = frames_from_images(source, cfg)
    else:
        frames = load_video_frames(source, cfg, cache=cache, uri=uri, version=version)
    return frames_to_rows(frames, cfg)


def write_video(
    path: str | os.PathLike[str],
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    codec: str | None = None,
    options: dict[str, str] | None = None,
) -> int:
    """Encode uint8 RGB frames (H, W, 3), even sides, as yuv420p video; returns the number of frames written.

    The codec defaults to libx264 (preset veryfast) when this FFmpeg has it, else mpeg4 at a high bit rate."""
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    if options is None:
        options = {"preset": "veryfast"} if codec == "libx264" else {}
    count = 0
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        for frame in frames:
            if (
                frame.dtype != np.uint8
                or frame.ndim != 3
                or frame.shape[2] != 3
                or frame.shape[0] % 2
                or frame.shape[1] % 2
            ):
                raise ValueError(
                    f"frames must be uint8 (H, W, 3) with even H and W, got {frame.dtype} {frame.shape}"
                )
            if count == 0:
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = options
                if codec == "mpeg4":
                    stream.bit_rate = 20_000_000
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
            count += 1
        if count == 0:
            raise ValueError("frames is empty: a video needs at least one frame")
        for packet in stream.encode():
            container.mux(packet)
    return count
