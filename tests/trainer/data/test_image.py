"""Image preprocessing against transformers 4.57.6's Qwen2VLImageProcessor (PIL path) and reference §10."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from trainer.data.image import (
    ImageLoadError,
    ImageProcessorConfig,
    load_image,
    patchify,
    preprocess_image,
    preprocess_images,
    smart_resize,
)

TOL = 1e-6

# (height, width). Heights 1 and 3 are left out: transformers reads an (H, W, 3) array with H in {1, 3} as
# channels-first and raises or scrambles the image. Sides of 8 to 27 px are in and agree with transformers.
# Sides of at most 14 px whose clamped size fits the pixel budget deliberately do not (see the module
# docstring); test_tiny_sides_clamp_like_qwen_vl_utils checks our behaviour there instead.
SIZES = [
    (224, 224), (20, 27), (15, 15), (10, 10), (8, 40), (27, 300), (30, 2000), (2000, 30), (37, 1200),
    (480, 640), (641, 479), (333, 517), (720, 1280), (1000, 1500), (56, 56), (97, 53), (150, 29), (512, 511),
]  # fmt: skip


def random_image(rng: np.random.Generator, height: int, width: int, mode: str = "RGB") -> Image.Image:
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        # Alpha only 0 or 255, so the white composite has one exact answer, computed below without PIL.
        alpha = np.where(rng.random((height, width)) < 0.3, 0, 255).astype(np.uint8)
        return Image.fromarray(np.dstack([np.asarray(rgb), alpha]))
    if mode == "P":
        return rgb.quantize(colors=64)
    return rgb


def white_composite(image: Image.Image) -> Image.Image:
    rgba = np.asarray(image.convert("RGBA"))
    assert set(np.unique(rgba[..., 3])) <= {0, 255}
    return Image.fromarray(np.where(rgba[..., 3:] == 0, 255, rgba[..., :3]).astype(np.uint8))


def parity_images() -> tuple[list[Image.Image], list[Image.Image]]:
    """Our inputs and what transformers gets: the same image, or its white composite when it has alpha,
    because transformers' convert("RGB") drops alpha where we composite on purpose."""
    rng = np.random.default_rng(1234)
    ours = [random_image(rng, h, w) for h, w in SIZES]
    ramp = np.arange(224 * 224 * 3, dtype=np.int64).reshape(224, 224, 3) % 256  # every value in every channel
    ours.append(Image.fromarray(ramp.astype(np.uint8)))
    ours += [random_image(rng, 90, 130, "RGBA"), random_image(rng, 300, 41, "RGBA")]
    ours += [random_image(rng, 200, 170, "P"), random_image(rng, 64, 400, "P")]
    with_transparency = random_image(rng, 120, 80, "P")
    with_transparency.info["transparency"] = 0
    ours.append(with_transparency)
    theirs = [white_composite(im) if im.mode == "RGBA" or "transparency" in im.info else im for im in ours]
    return ours, theirs


@pytest.mark.parametrize(("min_pixels", "max_pixels"), [(3136, 12845056), (3136, 1003520), (100352, 200704)])
def test_matches_transformers(min_pixels, max_pixels):
    cfg = ImageProcessorConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    ours, theirs = parity_images()
    assert len(ours) >= 20
    pixel_values, grid = preprocess_images(ours, cfg)
    hf = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    ref = hf(images=theirs, return_tensors="pt")
    assert pixel_values.dtype == torch.float32 and grid.dtype == torch.int64
    assert torch.equal(grid, ref["image_grid_thw"])
    assert pixel_values.shape == ref["pixel_values"].shape
    assert (pixel_values - ref["pixel_values"]).abs().max().item() <= TOL


def test_single_image_api_and_overrides():
    image = random_image(np.random.default_rng(7), 300, 500)
    cfg = ImageProcessorConfig()
    rows, grid = preprocess_image(image, cfg, max_pixels=50176)
    ref = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=50176)(images=[image], return_tensors="np")
    assert grid == tuple(ref["image_grid_thw"][0]) == (1, 12, 20)
    assert rows.dtype == np.float32 and np.abs(rows - ref["pixel_values"]).max() <= TOL
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    from_bytes, _ = preprocess_image(encoded.getvalue(), cfg, max_pixels=50176)
    np.testing.assert_array_equal(from_bytes, rows)
    empty_values, empty_grid = preprocess_images([], cfg)
    assert empty_values.shape == (0, 1176) and empty_grid.shape == (0, 3)


@pytest.mark.parametrize(
    ("height", "width", "max_pixels", "expected"),
    [
        (1080, 1920, 12845056, (1092, 1932)),
        (1080, 1920, 1003520, (728, 1316)),
        (224, 224, 12845056, (224, 224)),
        (20, 20, 12845056, (56, 56)),
    ],
)
def test_smart_resize_reference_table(height, width, max_pixels, expected):
    assert smart_resize(height, width, 28, 3136, max_pixels) == expected


def test_smart_resize_agrees_with_transformers_when_sides_exceed_half_a_factor():
    rng = np.random.default_rng(0)
    sides = np.concatenate([np.arange(15, 200), rng.integers(200, 6000, 200)])
    for min_pixels, max_pixels in [(3136, 12845056), (3136, 1003520), (100352, 200704), (0, 50176)]:
        for height in sides[::3]:
            for width in rng.choice(sides, 20):
                h, w = int(height), int(width)
                if max(h, w) / min(h, w) > 200:
                    continue
                assert smart_resize(h, w, 28, min_pixels, max_pixels) == hf_smart_resize(
                    h, w, 28, min_pixels, max_pixels
                ), (h, w, min_pixels, max_pixels)


def test_tiny_sides_clamp_like_qwen_vl_utils():
    # A side of <= 14 px rounds to 0 multiples of 28. We clamp it to 28 like qwen-vl-utils; transformers
    # 4.57.6 does not, and its min-pixels branch then squeezes the long side.
    assert smart_resize(14, 500) == (28, 504)
    assert hf_smart_resize(14, 500, 28, 3136, 12845056) == (28, 336)
    assert smart_resize(14, 2800) == (28, 2800)
    assert hf_smart_resize(14, 2800, 28, 3136, 12845056) == (28, 812)
    assert smart_resize(10, 10, min_pixels=0) == (28, 28)  # transformers returns (0, 0) here
    # Below the min budget both scale up the same way.
    assert smart_resize(1, 1) == smart_resize(10, 10) == (56, 56)
    assert hf_smart_resize(10, 10, 28, 3136, 12845056) == (56, 56)
    rows, grid = preprocess_image(Image.new("RGB", (500, 14), (10, 20, 30)), ImageProcessorConfig())
    assert grid == (1, 2, 36) and rows.shape == (72, 1176)


def test_smart_resize_rejects_bad_shapes():
    assert smart_resize(10, 2000) == (28, 1988)  # ratio exactly 200 is allowed
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2001)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(3000, 14)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 10, 30)
    rgba[0, :, 3] = 0  # fully transparent over a non-white colour
    rgba[1, :, 3] = 255
    rgba[2, :, 3] = 128
    image = Image.fromarray(rgba)
    path = tmp_path / "sticker.png"
    image.save(path)
    for source in (image, path, str(path), path.read_bytes()):
        out = np.asarray(load_image(source)).astype(int)
        assert out.shape == (4, 4, 3)
        assert (out[0] == 255).all()
        assert (out[1] == (200, 10, 30)).all()
        assert np.abs(out[2] - (255 * 127 + np.array([200, 10, 30]) * 128) / 255).max() <= 1
    alpha = np.array([[0, 255], [255, 0]])
    grey = Image.fromarray(np.stack([np.full((2, 2), 40), alpha], -1).astype(np.uint8))
    assert np.asarray(load_image(grey)).tolist() == [[[255] * 3, [40] * 3], [[40] * 3, [255] * 3]]  # LA
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 9, 8, 7])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(load_image(palette)).tolist() == [[[255, 255, 255], [9, 8, 7]]]


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "not_an_image.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ImageLoadError, match="not_an_image.jpg"):
        load_image(bad)
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="5 bytes"):
        load_image(b"\x89PNG\x00")


def test_patchify_order_is_merge_window_major():
    cfg = ImageProcessorConfig()
    frames_n, height, width = 4, 56, 84  # grid (2, 4, 6): merge windows 2 x 3 per temporal slice
    t, c, y, x = np.meshgrid(*(np.arange(s) for s in (frames_n, 3, height, width)), indexing="ij")
    frames = (((t * 3 + c) * height + y) * width + x).astype(np.float32)  # every value unique and exact
    rows, grid = patchify(frames, cfg)
    assert grid == (2, 4, 6) and rows.shape == (48, 1176)
    row = 0
    for tg in range(2):
        for wy in range(2):
            for wx in range(3):
                for my in range(2):
                    for mx in range(2):
                        y0, x0 = (2 * wy + my) * 14, (2 * wx + mx) * 14
                        expected = frames[2 * tg : 2 * tg + 2, :, y0 : y0 + 14, x0 : x0 + 14]
                        # Row layout (c, t, y, x), the Conv3d weight's flatten order (reference §2.1).
                        got = rows[row].reshape(3, 2, 14, 14)
                        np.testing.assert_array_equal(got, expected.swapaxes(0, 1))
                        row += 1


def test_patchify_pads_time_by_repeating_the_last_frame():
    cfg = ImageProcessorConfig()
    frames = np.random.default_rng(3).standard_normal((3, 3, 28, 56)).astype(np.float32)
    single, grid = patchify(frames[:1], cfg)
    assert grid == (1, 2, 4)
    per_frame = single.reshape(-1, 3, 2, 196)
    np.testing.assert_array_equal(per_frame[:, :, 0], per_frame[:, :, 1])
    odd, grid = patchify(frames, cfg)
    assert grid == (2, 2, 4)
    padded, _ = patchify(np.concatenate([frames, frames[2:]]), cfg)
    np.testing.assert_array_equal(odd, padded)
    with pytest.raises(ValueError, match="multiple of 28"):
        patchify(np.zeros((1, 3, 28, 30), np.float32), cfg)


def test_image_rows_hold_two_identical_frames():
    rows, grid = preprocess_image(random_image(np.random.default_rng(5), 100, 60), ImageProcessorConfig())
    per_frame = rows.reshape(-1, 3, 2, 196)
    np.testing.assert_array_equal(per_frame[:, :, 0], per_frame[:, :, 1])
    assert grid[0] == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_pixels", -1),
        ("max_pixels", 700),
        ("max_pixels", 1.5e6),
        ("patch_size", 0),
        ("temporal_patch_size", 0),
        ("merge_size", True),
        ("image_mean", (0.5, 0.5)),
        ("image_std", (0.5, 0.0, 0.5)),
        ("image_std", "abc"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ImageProcessorConfig(**{field: value})


def test_config_rejects_min_above_max():
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessorConfig(min_pixels=200000, max_pixels=100000)
    assert ImageProcessorConfig(image_mean=[0.5, 0.5, 0.5]).image_mean == (0.5, 0.5, 0.5)
