"""Qwen2-VL image preprocessing: decode, resize to multiples of 28, normalise, cut into merge-ordered patches.

The output is the contract with the vision tower: `pixel_values` rows of 3*2*14*14 values flattened as
(channel, time, y, x), rows ordered merge window by merge window (reference §10.3 step 7), and an int64
`image_grid_thw` row (1, H/14, W/14) per image. The reference for the numbers is transformers 4.57.6's
`Qwen2VLImageProcessor` on its PIL path; tests/trainer/data/test_image.py holds us to it (max abs diff 1e-6).

Decisions:

* Sides of at most factor/2 pixels (14 px by default). `smart_resize` clamps the rounded sides to at least
  `factor` before checking the pixel budget, as qwen-vl-utils does; that pipeline is the one the released
  models were trained with. transformers 4.57.6 does not clamp there (4.45 raised instead): such a side rounds
  to 0, which always forces the min-pixels branch and squeezes the long side (14x500 becomes 28x336 rather
  than our 28x504), and with min_pixels=0 it returns a zero-sized image. Wherever both sides are over
  factor/2, or the image would be scaled up to min_pixels anyway, the two agree exactly. Non-positive sizes
  raise ValueError (transformers divides by zero or computes nonsense).
* Transparency. Transparent pixels (RGBA, LA, palette or colour-key transparency) are composited onto white,
  as in qwen-vl-utils 0.0.10. transformers' `convert("RGB")` drops alpha and keeps whatever colour is stored
  under it (often black), so for such images we differ from it on purpose. Opaque images match it exactly.
  EXIF orientation is not applied: neither reference applies it to an image it is given.
* Numerics. The resize is the same PIL bicubic resize as the reference, so the uint8 pixels are identical.
  Rescale and normalise are fused into one float32 multiply-add, x * 1/(255 std) - mean/std, instead of the
  reference's float64 rescale followed by a float32 subtract and divide. Two thirds of the values then differ
  from the reference by a float32 rounding or two, at most 4.8e-7; the map depends only on (channel, uint8
  value), and the parity test's ramp image covers all 768 cases.
* Speed (a data-loader hot path). The patch shuffle is done on the uint8 pixels, a quarter of the bytes of
  the float image, into one contiguous array; the multiply-add then runs over cache-sized chunks of it and
  each chunk is written straight into both temporal copies of the output rows, so the float output is written
  once and never re-read. `preprocess_images` sizes every image first and fills one preallocated buffer, so
  there is no concatenation copy. bench/bench_image_preprocess.py measures this against transformers.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

ImageSource = str | os.PathLike[str] | bytes | Image.Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200

# Patches per multiply-add chunk: 256 x 3 x 196 float32 is ~600 KB, small enough to stay in L2.
_CHUNK_PATCHES = 256
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WHITE = (255, 255, 255, 255)


class ImageLoadError(ValueError):
    """An image source could not be read or decoded; the message names the source."""


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 12845056
) -> tuple[int, int]:
    """Return (height, width), both multiples of `factor`, close to the input aspect ratio and with an area
    within [min_pixels, max_pixels] (shrinking may land slightly under min_pixels; the reference does too)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio of a {height}x{width} image is over {MAX_ASPECT_RATIO}: "
            f"{max(height, width) / min(height, width):.1f}"
        )
    # round() is banker's rounding, as in the reference: 42 px (1.5 factors) becomes 56, 70 (2.5) becomes 56.
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    # The float expressions below keep the reference's exact operation order so results agree to the pixel.
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(kw_only=True, slots=True)
class ImageProcessorConfig:
    """Preprocessing settings; the defaults are the released -Instruct checkpoints' preprocessor_config.json
    (the transformers class default max_pixels is 1,003,520 instead)."""

    min_pixels: int = 3136
    max_pixels: int = 12845056
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("min_pixels", self.min_pixels, minimum=0)
        # smart_resize never goes below one merge window, so a smaller budget could not be honoured.
        _require_int("max_pixels", self.max_pixels, minimum=self.factor**2)
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        self.image_mean = _per_channel("image_mean", self.image_mean, positive=False)
        self.image_std = _per_channel("image_std", self.image_std, positive=True)

    @property
    def factor(self) -> int:
        """Side multiple of a resized image: one merge window of patches."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per pixel_values row: 3 channels x temporal_patch_size frames x patch_size^2."""
        return 3 * self.temporal_patch_size * self.patch_size**2


def _require_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _per_channel(name: str, value: Iterable[float], *, positive: bool) -> tuple[float, float, float]:
    kind = "finite positive" if positive else "finite"
    try:
        r, g, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 {kind} numbers (R, G, B), got {value!r}") from None
    if not all(math.isfinite(v) for v in (r, g, b)) or (positive and min(r, g, b) <= 0):
        raise ValueError(f"{name} must be 3 {kind} numbers (R, G, B), got {value!r}")
    return r, g, b


def load_image(source: ImageSource) -> Image.Image:
    """Decode a path, encoded bytes or a PIL image into an RGB image, transparent pixels made white."""
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    is_bytes = isinstance(source, bytes | bytearray | memoryview)
    name = f"<{len(source)} bytes>" if is_bytes else os.fspath(source)
    try:
        # Opening the file ourselves closes it on return; load() decodes now so truncated data fails here.
        with io.BytesIO(source) if is_bytes else open(name, "rb") as fp:
            image = Image.open(fp)
            image.load()
            return _to_rgb(image)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot load image {name}: {e}") from e


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
    if not has_alpha:
        return image if image.mode == "RGB" else image.convert("RGB")
    white = Image.new("RGBA", image.size, _WHITE)
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def _merge_window_view(groups: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """View (G, T, C, H, W) as (G, H/28, W/28, 2, 2, C, T, 14, 14): one row per patch, merge windows
    contiguous (reference §10.3 step 7), each row flattened (c, t, y, x) as the Conv3d weight expects."""
    g, t, c, h, w = groups.shape
    p, m = cfg.patch_size, cfg.merge_size
    split = groups.reshape(g, t, c, h // (p * m), m, p, w // (p * m), m, p)
    return split.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)


def _fused_affine(cfg: ImageProcessorConfig) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(cfg.image_mean, dtype=np.float64)
    std = np.asarray(cfg.image_std, dtype=np.float64)
    # Constants derived in float64 and rounded once, so the only float32 error is in the multiply-add itself.
    scale = (1.0 / (255.0 * std)).astype(np.float32)[:, None]
    offset = (-mean / std).astype(np.float32)[:, None]
    return scale, offset


def _patchify_rgb_into(pixels: np.ndarray, cfg: ImageProcessorConfig, out: np.ndarray) -> None:
    """Normalise and patchify one uint8 (H, W, 3) image into `out`, its rows of pixel_values."""
    area = cfg.patch_size**2
    channels_first = pixels.transpose(2, 0, 1)[None, None]
    patches = np.ascontiguousarray(_merge_window_view(channels_first, cfg)).reshape(-1, 3, area)
    rows = out.reshape(len(patches), 3, cfg.temporal_patch_size, area)
    scale, offset = _fused_affine(cfg)
    chunk = np.empty((min(_CHUNK_PATCHES, len(patches)), 3, area), dtype=np.float32)
    for start in range(0, len(patches), _CHUNK_PATCHES):
        src = patches[start : start + _CHUNK_PATCHES]
        buf = chunk[: len(src)]
        np.multiply(src, scale, out=buf, dtype=np.float32)
        np.add(buf, offset, out=buf)
        # A still image is its own second frame: broadcast the chunk into every temporal slot.
        rows[start : start + len(src)] = buf[:, :, None, :]


def patchify(frames: np.ndarray, cfg: ImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Cut normalised float frames (F, 3, H, W) into pixel_values rows and return them with (t, h, w).

    H and W must be multiples of patch_size * merge_size. Frames are grouped temporal_patch_size at a time;
    a short last group is padded by repeating the last frame, so a single image becomes identical frames.
    """
    if frames.ndim != 4 or frames.shape[1] != 3 or not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be float (F, 3, H, W), got {frames.dtype} {frames.shape}")
    n, c, h, w = frames.shape
    if n == 0 or h % cfg.factor or w % cfg.factor:
        raise ValueError(f"need at least one frame with sides multiple of {cfg.factor}, got {frames.shape}")
    tp, p = cfg.temporal_patch_size, cfg.patch_size
    grid = (-(-n // tp), h // p, w // p)
    per_group = grid[1] * grid[2]
    out = np.empty((grid[0] * per_group, cfg.patch_dim), dtype=np.float32)
    full = n // tp
    if full:
        src = _merge_window_view(frames[: full * tp].reshape(full, tp, c, h, w), cfg)
        np.copyto(out[: full * per_group].reshape(src.shape), src)
    if n % tp:
        last = frames[full * tp :]
        padded = (
            np.broadcast_to(last, (tp, c, h, w))
            if len(last) == 1
            else np.concatenate([last, np.broadcast_to(frames[-1:], (tp - len(last), c, h, w))])
        )
        src = _merge_window_view(padded[None], cfg)
        np.copyto(out[full * per_group :].reshape(src.shape), src)
    return out, grid


def _target_size(
    image: Image.Image, cfg: ImageProcessorConfig, min_pixels: int | None, max_pixels: int | None
) -> tuple[int, int]:
    return smart_resize(
        image.height,
        image.width,
        factor=cfg.factor,
        min_pixels=cfg.min_pixels if min_pixels is None else min_pixels,
        max_pixels=cfg.max_pixels if max_pixels is None else max_pixels,
    )


def _resized_pixels(image: Image.Image, height: int, width: int) -> np.ndarray:
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image)


def preprocess_image(
    image: ImageSource,
    cfg: ImageProcessorConfig,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image to (pixel_values rows [h*w, patch_dim] float32, grid (1, h, w)); min/max_pixels override
    the config's pixel budget for this image."""
    rgb = load_image(image)
    height, width = _target_size(rgb, cfg, min_pixels, max_pixels)
    grid = (1, height // cfg.patch_size, width // cfg.patch_size)
    out = np.empty((grid[1] * grid[2], cfg.patch_dim), dtype=np.float32)
    _patchify_rgb_into(_resized_pixels(rgb, height, width), cfg, out)
    return out, grid


def preprocess_images(
    images: Sequence[ImageSource], cfg: ImageProcessorConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images to (pixel_values [sum h*w, patch_dim] float32, image_grid_thw [n, 3] int64), in order."""
    rgbs = [load_image(image) for image in images]
    sizes = [_target_size(rgb, cfg, None, None) for rgb in rgbs]
    p = cfg.patch_size
    grids = [(1, h // p, w // p) for h, w in sizes]
    pixel_values = np.empty((sum(gh * gw for _, gh, gw in grids), cfg.patch_dim), dtype=np.float32)
    start = 0
    for rgb, (height, width), (_, gh, gw) in zip(rgbs, sizes, grids, strict=True):
        _patchify_rgb_into(_resized_pixels(rgb, height, width), cfg, pixel_values[start : start + gh * gw])
        start += gh * gw
    image_grid_thw = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
    return torch.from_numpy(pixel_values), image_grid_thw
