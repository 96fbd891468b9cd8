"""Grounding helpers: normalisation never yields 1000, round trips stay within half a bin, parsing of messy
generated text, and IoU."""

from __future__ import annotations

import random

import pytest

from trainer.data.grounding import (
    GroundedBox,
    box_iou,
    denormalize_box,
    format_box,
    normalize_box,
    object_ref,
    parse_boxes,
)
from trainer.data.tokenizer import BOX_END, BOX_START, OBJECT_REF_END, OBJECT_REF_START, Qwen2VLTokenizer


def test_normalize_floors_and_never_reaches_1000() -> None:
    assert normalize_box((0, 0, 224, 224), 224, 224) == (0, 0, 999, 999)
    assert normalize_box((29, 57, 30, 58), 100, 100) == (290, 570, 300, 580)  # float math would give 289, 569
    assert normalize_box((0.5, 0, 640, 479.9), 640, 480) == (0, 0, 999, 999)
    assert normalize_box((-3, -1, 700, 500), 640, 480) == (0, 0, 999, 999)  # outside the image: clamped
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(1, 4000), rng.randint(1, 4000)
        x1, x2 = sorted(rng.randint(0, w) for _ in range(2))
        y1, y2 = sorted(rng.randint(0, h) for _ in range(2))
        box = normalize_box((x1, y1, x2, y2), w, h)
        assert all(0 <= v <= 999 for v in box)
        assert box == tuple(
            min(int(c * 1000 // s), 999) for c, s in zip((x1, y1, x2, y2), (w, h, w, h), strict=True)
        )


def test_round_trip_is_within_half_a_bin() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        w, h = rng.randint(28, 3000), rng.randint(28, 3000)
        x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
        back = denormalize_box(normalize_box((x1, y1, x2, y2), w, h), w, h)
        for got, want, size in zip(back, (x1, y1, x2, y2), (w, h, w, h), strict=True):
            # Half a bin, plus up to one bin at the far edge where 1000 is clamped to 999.
            assert abs(got - want) <= size / 2000 + (size / 1000 if want >= size * 0.999 else 0) + 1e-9


def test_format_and_parse_round_trip() -> None:
    text = format_box((176, 106, 232, 160), "the eyes on a giraffe")
    assert text == (
        "<|object_ref_start|>the eyes on a giraffe<|object_ref_end|><|box_start|>(176,106),(232,160)<|box_end|>"
    )
    assert parse_boxes(text) == [GroundedBox((176, 106, 232, 160), "the eyes on a giraffe")]
    assert format_box((0, 0, 999, 999)) == "<|box_start|>(0,0),(999,999)<|box_end|>"
    assert object_ref("a cat") == "<|object_ref_start|>a cat<|object_ref_end|>"
    # Each marker is one special token, so the model emits them as such.
    ids = Qwen2VLTokenizer.builtin().encode(text)
    assert [i for i in ids if i >= 151646] == [OBJECT_REF_START, OBJECT_REF_END, BOX_START, BOX_END]


@pytest.mark.parametrize(
    "box",
    [(1, 2, 3), (0, 0, 1000, 5), (5, 5, 4, 6), (0.5, 1, 2, 3), (-1, 0, 2, 2)],
)
def test_format_rejects_bad_boxes(box: tuple) -> None:
    with pytest.raises(ValueError):
        format_box(box)


def test_parse_tolerates_messy_text() -> None:
    text = (
        "Sure! <|object_ref_start|> the red triangle <|object_ref_end|>\n <|box_start|>( 12 , 34 ) ,(56,78 )<|box_end|>"
        " and also <|box_start|>(100,200),(300,400)<|box_end|>"  # no reference phrase
        "<|box_start|>(1,2),(3<|box_end|>"  # truncated: skipped
        "<|object_ref_start|>dog<|object_ref_end|> is here: <|box_start|>(5,5),(6,6)<|box_end|>"  # phrase not adjacent
        "<|box_start|>(900,900),(100,1000)<|box_end|>"  # corners swapped, 1000 clamped
        "<|box_start|>(1,1),(2000,2)<|box_end|>"  # out of range: skipped
        "<|box_start|>(1.5,1),(2,2)<|box_end|> trailing garbage (1,2),(3,4)"
    )
    assert parse_boxes(text) == [
        GroundedBox((12, 34, 56, 78), "the red triangle"),
        GroundedBox((100, 200, 300, 400)),
        GroundedBox((5, 5, 6, 6)),
        GroundedBox((100, 900, 900, 999)),
    ]
    assert parse_boxes("") == [] and parse_boxes("no boxes (1,2),(3,4) here") == []


def test_iou() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges share no area
    assert box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0
    with pytest.raises(ValueError, match="top-left then bottom-right"):
        box_iou((5, 5, 0, 0), (0, 0, 1, 1))
