"""Synthetic vision-language data from a seed: shapes to caption and ground, moving shapes, templated text.

Nothing is downloaded; the same seed gives byte-identical files (with the same Pillow, zlib and PyAV builds).
`generate(dest, ...)` writes, to a local folder or any fsspec URL (s3://bucket/prefix with storage options):

    manifest.json                  the settings, the counts and the files (written last: its presence means done)
    {train,val}/images/img-N.png   1-3 coloured shapes (circle, square, triangle) on a solid, gradient or noisy
                                   background
    {train,val}/captions.jsonl     image-text pairs: "A red triangle on a navy background."
    {train,val}/grounding.jsonl    "Where is the red triangle?" answered with the box in the grounding format
    {train,val}/videos/vid-N.mp4   a shape moving left, right, up or down (H.264, 112x112, 10 fps, 3 s)
    {train,val}/video_qa.jsonl     "Which way does the red square move? ..." answered "left" etc.
    {train,val}/text.jsonl         templated sentences

Decisions:

- Every item has its own generator, seeded from (seed, kind, index): item k is the same whatever the other
  counts are. The last round(n * val_fraction) items of each kind (at least one when n >= 2) are held out (val).
- Ground truth sits in each record's `meta` (boxes in pixels and normalised, direction), which training
  ignores and an evaluation scores against (IoU > 0.5, the right direction).
- Boxes are the drawn shape's exact pixel bounds, taken from its mask, not from the geometry asked for.
  Shapes in one image never overlap and have distinct colours, so "the red triangle" names one shape and
  nothing hides part of it. Background colours are dull and named apart from the shape colours.
- Videos are H.264 in MP4 at 112x112 (4x4 merged patches per frame): cheap to decode, and the records ask
  for that size (`min_pixels`/`max_pixels`) rather than the video default, which would upscale to ~316x316.
  The writer here is a minimal PyAV one; `trainer.data.video.write_video` may replace it.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from trainer.data.grounding import format_box, normalize_box

FORMAT_VERSION = 1
SHAPES = ("circle", "square", "triangle")
SHAPE_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 50, 190),
    "orange": (250, 130, 10),
}
BACKGROUND_COLORS = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "beige": (225, 210, 180),
    "navy": (25, 35, 90),
    "teal": (20, 110, 110),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_KIND_SEEDS = {"image": 1, "video": 2, "text": 3}


@dataclass(kw_only=True, slots=True)
class SyntheticConfig:
    seed: int = 0
    num_images: int = 100
    num_videos: int = 20
    num_texts: int = 100
    image_size: int = 224  # square images; a multiple of 28 keeps the size through preprocessing
    max_shapes: int = 3
    video_size: int = 112
    video_fps: int = 10
    video_seconds: float = 3.0
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("seed", "num_images", "num_videos", "num_texts"):
            _require_int(name, getattr(self, name), 0)
        _require_int("image_size", self.image_size, 56)
        _require_int("max_shapes", self.max_shapes, 1)
        if self.max_shapes > len(SHAPE_COLORS):
            raise ValueError(f"max_shapes must be at most {len(SHAPE_COLORS)} (one colour each)")
        _require_int("video_size", self.video_size, 56)
        if self.video_size % 2:
            raise ValueError(f"video_size must be even (4:2:0 video), got {self.video_size}")
        _require_int("video_fps", self.video_fps, 1)
        if not 0 < self.video_seconds <= 60 or self.video_seconds * self.video_fps < 2:
            raise ValueError(f"video_seconds must be in (0, 60] and give 2+ frames, got {self.video_seconds}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    def num_val(self, total: int) -> int:
        """Held-out items out of `total`: at least one when there are two or more and val_fraction > 0."""
        if total < 2 or self.val_fraction == 0:
            return 0
        return min(total - 1, max(1, round(total * self.val_fraction)))


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _rng(cfg: SyntheticConfig, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, _KIND_SEEDS[kind], index])


# ----------------------------------------------------------------------------------------------------------
# Drawing


def _background(rng: np.random.Generator, size: int, *, allow_noise: bool) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 pixels and the caption's name for them."""
    names = list(BACKGROUND_COLORS)
    style = rng.choice(["solid", "gradient", "noise"] if allow_noise else ["solid", "gradient"])
    if style == "solid":
        name = names[rng.integers(len(names))]
        return np.full((size, size, 3), BACKGROUND_COLORS[name], dtype=np.uint8), f"a {name} background"
    if style == "gradient":
        a, b = rng.choice(len(names), size=2, replace=False)
        ramp = np.linspace(0.0, 1.0, size)[:, None]
        line = (1 - ramp) * BACKGROUND_COLORS[names[a]] + ramp * BACKGROUND_COLORS[names[b]]
        pixels = np.broadcast_to(line[:, None, :] if rng.integers(2) else line[None, :, :], (size, size, 3))
        return np.round(pixels).astype(np.uint8), "a gradient background"
    # Gray noise: the channels stay within 80 of each other, far from every saturated shape colour.
    base = int(rng.integers(70, 186))
    noise = rng.integers(base - 40, base + 41, size=(size, size, 3))
    return noise.astype(np.uint8), "a noisy background"


def _shape_mask(kind: str, box: tuple[int, int, int, int], size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1, x2, y2 = box  # edge coordinates; PIL's shape boxes are inclusive, hence the -1
    if kind == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=255)
    elif kind == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=255)
    else:
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=255)
    return mask


def _paint(pixels: np.ndarray, kind: str, color: str, box: tuple[int, int, int, int]) -> list[int]:
    """Draw a shape in place; return its exact pixel bounds [x1, y1, x2, y2] (edges, exclusive end)."""
    mask = _shape_mask(kind, box, pixels.shape[0])
    pixels[np.asarray(mask) > 0] = SHAPE_COLORS[color]
    return list(mask.getbbox() or box)


def _disjoint(box: tuple[int, ...], others: list[tuple[int, ...]], gap: int) -> bool:
    return all(
        box[2] + gap <= o[0] or o[2] + gap <= box[0] or box[3] + gap <= o[1] or o[3] + gap <= box[1]
        for o in others
    )


def draw_scene(rng: np.random.Generator, size: int, max_shapes: int) -> tuple[Image.Image, dict[str, Any]]:
    """An image of 1..max_shapes shapes and its description (background phrase, shapes with boxes)."""
    pixels, background = _background(rng, size, allow_noise=True)
    pixels = pixels.copy()
    colors = [str(c) for c in rng.choice(list(SHAPE_COLORS), size=max_shapes, replace=False)]
    wanted = int(rng.integers(1, max_shapes + 1))
    placed: list[tuple[int, ...]] = []
    shapes: list[dict[str, Any]] = []
    for _ in range(50 * wanted):  # rejection sampling; a crowded draw just gets fewer shapes
        if len(shapes) == wanted:
            break
        side = int(rng.integers(size * 15 // 100, size * 35 // 100 + 1))
        x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        box = (x, y, x + side, y + side)
        if not _disjoint(box, placed, gap=2):
            continue
        placed.append(box)
        kind, color = str(rng.choice(SHAPES)), colors[len(shapes)]
        bounds = _paint(pixels, kind, color, box)
        shapes.append(
            {"shape": kind, "color": color, "box_px": bounds, "box": list(normalize_box(bounds, size, size))}
        )
    return Image.fromarray(pixels), {"background": background, "size": [size, size], "shapes": shapes}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Mapping[str, Any]) -> str:
    names = [f"{_article(s['color'])} {s['color']} {s['shape']}" for s in scene["shapes"]]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed[0].upper()}{listed[1:]} on {scene['background']}."


def draw_moving_shape(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """(frames (T, H, W, 3) uint8, description) of one shape crossing the frame in one direction."""
    size, count = cfg.video_size, max(2, round(cfg.video_seconds * cfg.video_fps))
    background, _ = _background(rng, size, allow_noise=False)
    kind, color = str(rng.choice(SHAPES)), str(rng.choice(list(SHAPE_COLORS)))
    direction = str(rng.choice(list(DIRECTIONS)))
    dx, dy = DIRECTIONS[direction]
    side = int(rng.integers(size // 5, size // 4 + 1))
    travel = int(rng.integers(size * 2 // 5, size - side + 1))  # at least 40% of the frame
    across = int(rng.integers(0, size - side + 1))
    start = int(rng.integers(0, size - side - travel + 1))
    if dx + dy < 0:  # left or up: start at the far end
        start += travel
    frames = np.empty((count, size, size, 3), dtype=np.uint8)
    boxes = []
    for k in range(count):
        along = start + round((dx + dy) * travel * k / (count - 1))
        x, y = (along, across) if dx else (across, along)
        frames[k] = background
        boxes.append(_paint(frames[k], kind, color, (x, y, x + side, y + side)))
    info = {
        "shape": kind,
        "color": color,
        "direction": direction,
        "frames": count,
        "fps": cfg.video_fps,
        "size": [size, size],
        "first_box_px": boxes[0],
        "last_box_px": boxes[-1],
    }
    return frames, info


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264/MP4 bytes of (T, H, W, 3) uint8 RGB frames; deterministic (one thread, bitexact muxing)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        # The same frames must give the same bytes in every process, whatever the machine's load or the process's
        # history (the dataset's checksums rely on it). So: one thread for x264 and its lookahead, said to libx264
        # directly as well; and no macroblock-tree rate control, whose output in this libx264 depends on memory it
        # reads before writing (the bytes changed with MALLOC_PERTURB_, and after torch, DeepSpeed and
        # transformers had been imported: tests/trainer/data/test_synthetic.py checks both).
        stream.options = {
            "crf": "18",
            "preset": "fast",
            "threads": "1",
            "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:mbtree=0",
        }
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Text

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_CORNERS = {"circle": "no corners", "square": "four corners", "triangle": "three corners"}
_RELATIONS = ("above", "below", "to the left of", "to the right of")
_NAMES = ("Ada", "Ben", "Chen", "Dara", "Emil", "Farah", "Goro", "Hana")


def _sentence(rng: np.random.Generator) -> str:
    shape, other = (str(s) for s in rng.choice(SHAPES, size=2))
    color, other_color = (str(c) for c in rng.choice(list(SHAPE_COLORS), size=2, replace=False))
    a, b = (int(v) for v in rng.integers(0, 6, size=2))
    template = int(rng.integers(5))
    if template == 0:
        return f"The {color} {shape} is {rng.choice(_RELATIONS)} the {other_color} {other}."
    if template == 1:
        return f"{_NUMBERS[a].capitalize()} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}."
    if template == 2:
        return f"{_article(shape).capitalize()} {shape} has {_CORNERS[shape]}."
    if template == 3:
        count = f"{_NUMBERS[a + 1]} {color} {shape}{'s' if a else ''}"  # a + 1: never "zero"
        return f"{rng.choice(_NAMES)} counted {count} on the table."
    direction = str(rng.choice(list(DIRECTIONS)))
    return f"The {color} {shape} moves {direction} across the screen."


def make_text(rng: np.random.Generator) -> str:
    return " ".join(_sentence(rng) for _ in range(int(rng.integers(3, 7))))


# ----------------------------------------------------------------------------------------------------------
# Records and writing


def _split(cfg: SyntheticConfig, total: int, index: int) -> str:
    return "val" if index >= total - cfg.num_val(total) else "train"


def _image_records(cfg: SyntheticConfig, index: int) -> tuple[str, bytes, list[tuple[str, dict[str, Any]]]]:
    rng = _rng(cfg, "image", index)
    image, scene = draw_scene(rng, cfg.image_size, cfg.max_shapes)
    png = io.BytesIO()
    image.save(png, format="PNG")
    name = f"img-{index:06d}"
    uri = f"images/{name}.png"
    pair = {"id": name, "image": uri, "text": caption(scene), "meta": scene}
    target = scene["shapes"][int(rng.integers(len(scene["shapes"])))]
    phrase = f"the {target['color']} {target['shape']}"
    question = {"type": "text", "text": f"Where is {phrase}?"}
    conversation = {
        "id": f"{name}-grounding",
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": uri}, question]},
            {"role": "assistant", "content": format_box(target["box"], phrase)},
        ],
        "meta": {
            "task": "grounding",
            "phrase": phrase,
            "box": target["box"],
            "box_px": target["box_px"],
            "size": scene["size"],
        },
    }
    return uri, png.getvalue(), [("captions.jsonl", pair), ("grounding.jsonl", conversation)]


def _video_record(cfg: SyntheticConfig, index: int) -> tuple[str, bytes, dict[str, Any]]:
    frames, info = draw_moving_shape(_rng(cfg, "video", index), cfg)
    name = f"vid-{index:06d}"
    uri = f"videos/{name}.mp4"
    video = {"type": "video", "video": uri, "min_pixels": 28 * 28, "max_pixels": cfg.video_size**2}
    question = f"Which way does the {info['color']} {info['shape']} move? Answer left, right, up or down."
    record = {
        "id": name,
        "messages": [
            {"role": "user", "content": [video, {"type": "text", "text": question}]},
            {"role": "assistant", "content": info["direction"]},
        ],
        "meta": {"task": "direction", **info},
    }
    return uri, encode_mp4(frames, cfg.video_fps), record


def generate(
    dest: str,
    *,
    seed: int = 0,
    num_images: int = 100,
    num_videos: int = 20,
    num_texts: int = 100,
    image_size: int = 224,
    storage_options: Mapping[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Write the synthetic dataset to `dest` (a folder or an fsspec URL); return the manifest.
    `settings` are the other SyntheticConfig fields (max_shapes, video_size, video_fps, ...)."""
    cfg = SyntheticConfig(
        seed=seed,
        num_images=num_images,
        num_videos=num_videos,
        num_texts=num_texts,
        image_size=image_size,
        **settings,
    )
    return write_dataset(dest, cfg, storage_options=storage_options)


def write_dataset(
    dest: str, cfg: SyntheticConfig, *, storage_options: Mapping[str, Any] | None = None
) -> dict:
    import fsspec

    fs, root = fsspec.core.url_to_fs(dest, **dict(storage_options or {}))
    root = root.rstrip("/")
    records: dict[str, list[dict[str, Any]]] = {}
    made: set[str] = set()

    def put(relative: str, data: bytes) -> None:
        folder = f"{root}/{relative}".rsplit("/", 1)[0]
        if folder not in made:
            fs.makedirs(folder, exist_ok=True)
            made.add(folder)
        fs.pipe_file(f"{root}/{relative}", data)

    for index in range(cfg.num_images):
        split = _split(cfg, cfg.num_images, index)
        uri, png, produced = _image_records(cfg, index)
        put(f"{split}/{uri}", png)
        for file, record in produced:
            records.setdefault(f"{split}/{file}", []).append(record)
    for index in range(cfg.num_videos):
        split = _split(cfg, cfg.num_videos, index)
        uri, mp4, record = _video_record(cfg, index)
        put(f"{split}/{uri}", mp4)
        records.setdefault(f"{split}/video_qa.jsonl", []).append(record)
    for index in range(cfg.num_texts):
        record = {"id": f"txt-{index:06d}", "text": make_text(_rng(cfg, "text", index))}
        records.setdefault(f"{_split(cfg, cfg.num_texts, index)}/text.jsonl", []).append(record)

    files = {}
    for path, rows in sorted(records.items()):
        put(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode())
        files[path] = len(rows)
    manifest = {"format_version": FORMAT_VERSION, "config": asdict(cfg), "files": files}
    put("manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, JSON objects (e.g. client_kwargs)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.synthetic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("dest", help="output folder or fsspec URL (s3://bucket/prefix, memory://x, ...)")
    for name in SyntheticConfig.__dataclass_fields__:
        default = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument(
        "--storage-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option, repeatable (e.g. endpoint_url=http://127.0.0.1:9000)",
    )
    args = vars(parser.parse_args(argv))
    dest, options = args.pop("dest"), dict(args.pop("storage_option"))
    try:
        manifest = write_dataset(dest, SyntheticConfig(**args), storage_options=options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"dest": dest, "files": manifest["files"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
