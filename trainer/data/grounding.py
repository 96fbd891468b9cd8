"""Grounding in Qwen2-VL's text format: boxes as normalised integers, written between special tokens.

    <|object_ref_start|>the red triangle<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>

(x1, y1) is the top-left corner, (x2, y2) the bottom-right one, each an integer in [0, 1000) relative to the
image's width and height (reference §9), so boxes do not depend on how the image is resized.

Decisions:

- Pixel boxes use edge coordinates: (0, 0) is the image's top-left corner and (width, height) its bottom-right
  corner, so a shape covering pixel columns a..b has x1 = a, x2 = b + 1 (PIL's `getbbox` convention).
- Pixels to normalised: floor(coord * 1000 / size), as Qwen-VL's int(coord / size * 1000), but in integer
  arithmetic (the float version turns 0.29 * 1000 into 289), then clamped to [0, 999]: the right or bottom
  edge of the image would give 1000, which the format does not have.
- Normalised to pixels: the centre of the value's bin, (n + 0.5) * size / 1000. Flooring maps a bin of
  size/1000 pixels to n, so the centre is the estimate with the smallest worst-case error (size/2000).
- Parsing model output is lenient, because generated text is: spaces anywhere inside the box, a missing
  reference phrase, several boxes, corners in either order, and garbage around or between boxes are all
  accepted. A box that does not parse (wrong number of values, non-integers, a value over 1000) is skipped;
  1000 itself is clamped to 999.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

NORM = 1000  # normalised coordinates are integers in [0, NORM)

OBJECT_REF_START = "<|object_ref_start|>"
OBJECT_REF_END = "<|object_ref_end|>"
BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"

Box = tuple[int, int, int, int]  # normalised (x1, y1, x2, y2)
PixelBox = tuple[float, float, float, float]

_INT = r"\s*([0-9]{1,6})\s*"
_REF_TOKEN = f"{re.escape(OBJECT_REF_START)}|{re.escape(OBJECT_REF_END)}"
_BOX = re.compile(
    rf"(?:{re.escape(OBJECT_REF_START)}(?P<phrase>(?:(?!{_REF_TOKEN}).)*?)"
    rf"{re.escape(OBJECT_REF_END)}\s*)?"
    rf"{re.escape(BOX_START)}\s*\({_INT},{_INT}\)\s*,\s*\({_INT},{_INT}\)\s*{re.escape(BOX_END)}",
    re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class GroundedBox:
    box: Box
    phrase: str | None = None  # the reference phrase right before the box, if there was one


def _to_norm(coord: float, size: int) -> int:
    # Multiply before dividing: exact for integer pixels, where coord / size * 1000 can land just under.
    value = int(coord * NORM // size)
    return min(max(value, 0), NORM - 1)


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")


def normalize_box(box: Sequence[float], width: int, height: int) -> Box:
    """Pixel edge coordinates (x1, y1, x2, y2) of a `width` x `height` image to integers in [0, 1000)."""
    _check_size(width, height)
    x1, y1, x2, y2 = _corners(box)
    return (_to_norm(x1, width), _to_norm(y1, height), _to_norm(x2, width), _to_norm(y2, height))


def denormalize_box(box: Sequence[int], width: int, height: int) -> PixelBox:
    """Normalised integers back to pixel coordinates (the centre of each value's bin)."""
    _check_size(width, height)
    x1, y1, x2, y2 = _corners(box)
    return (
        (x1 + 0.5) * width / NORM,
        (y1 + 0.5) * height / NORM,
        (x2 + 0.5) * width / NORM,
        (y2 + 0.5) * height / NORM,
    )


def _corners(box: Sequence[float]) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"a box is (x1, y1, x2, y2), got {len(box)} values: {tuple(box)}")
    x1, y1, x2, y2 = box
    if x1 > x2 or y1 > y2:
        raise ValueError(f"box corners must be top-left then bottom-right, got {tuple(box)}")
    return x1, y1, x2, y2


def object_ref(phrase: str) -> str:
    """A reference phrase between its tokens, as used before a box or alone in a question."""
    if OBJECT_REF_START in phrase or OBJECT_REF_END in phrase:
        raise ValueError(f"phrase contains a reference token: {phrase!r}")
    return f"{OBJECT_REF_START}{phrase}{OBJECT_REF_END}"


def format_box(box: Sequence[int], phrase: str | None = None) -> str:
    """`[ref]<|box_start|>(x1,y1),(x2,y2)<|box_end|>` for a normalised box, the phrase first if given."""
    x1, y1, x2, y2 = _corners(box)
    values = (x1, y1, x2, y2)
    if not all(isinstance(v, int) and 0 <= v < NORM for v in values):
        raise ValueError(f"normalised box values must be integers in [0, {NORM}), got {values}")
    text = f"{BOX_START}({x1},{y1}),({x2},{y2}){BOX_END}"
    return text if phrase is None else object_ref(phrase) + text


def parse_boxes(text: str) -> list[GroundedBox]:
    """Every well-formed box in `text`, in order, with the reference phrase written right before it."""
    found: list[GroundedBox] = []
    for match in _BOX.finditer(text):
        values = [int(v) for v in match.groups()[1:]]
        if max(values) > NORM:
            continue
        x1, y1, x2, y2 = (min(v, NORM - 1) for v in values)
        phrase = match.group("phrase")
        box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
        found.append(GroundedBox(box, phrase.strip() if phrase is not None else None))
    return found


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes in the same coordinates; 0 when both are empty."""
    ax1, ay1, ax2, ay2 = _corners(a)
    bx1, by1, bx2, by2 = _corners(b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0
