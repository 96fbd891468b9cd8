"""The JSONL sample format: parsing every kind, one-line errors naming file:line and field, and encoding real
synthetic samples (images through image.py, videos decoded with PyAV) into ids, labels and vision inputs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from trainer.data.chat import IGNORE_INDEX, render_chat
from trainer.data.formats import (
    ConversationSample,
    ImageItem,
    InterleavedSample,
    PairSample,
    SampleError,
    TextItem,
    TextSample,
    VideoItem,
    encode_sample,
    iter_jsonl,
    parse_line,
    resolve_uri,
)
from trainer.data.image import ImageProcessorConfig, patchify, smart_resize
from trainer.data.synthetic import generate
from trainer.data.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    Qwen2VLTokenizer,
)


def _line(obj: Any) -> str:
    return json.dumps(obj)


def _user_image(uri: str, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image", "image": uri, **extra}, {"text": "What?"}]}


def test_conversation_items_and_path_resolution() -> None:
    line = _line(
        {
            "id": 7,
            "meta": {"k": 1},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": "img/a.png", "min_pixels": 3136, "max_pixels": 50176},
                        {"image": "/abs/b.png"},
                        {
                            "type": "video",
                            "video": ["f/1.jpg", "s3://bucket/f/2.jpg"],
                            "fps": 2,
                            "nframes": 4,
                        },
                        {"video": "file:///data/clip%201.mp4"},
                        {"type": "text", "text": "Compare."},
                    ],
                },
                {"role": "assistant", "content": "Same."},
            ],
        }
    )
    sample = parse_line(line, "d.jsonl:1", base="/data/set")
    assert isinstance(sample, ConversationSample)
    assert (sample.id, sample.meta, sample.source) == ("7", {"k": 1}, "d.jsonl:1")
    assert [m.role for m in sample.messages] == ["system", "user", "assistant"]
    items = sample.messages[1].content
    assert items == (
        ImageItem("/data/set/img/a.png", 3136, 50176),
        ImageItem("/abs/b.png"),
        VideoItem(("/data/set/f/1.jpg", "s3://bucket/f/2.jpg"), fps=2.0, nframes=4),
        VideoItem("/data/clip 1.mp4"),
        TextItem("Compare."),
    )


def test_pretraining_kinds() -> None:
    text = parse_line(_line({"text": "Just text."}), "p:1")
    pair = parse_line(
        _line({"image": "a.png", "text": "A cap.", "max_pixels": 50176}), "p:2", base="s3://b/d"
    )
    inter = parse_line(
        _line({"interleaved": [{"text": "x"}, {"image": "../i.png"}, {"video": "v.mp4"}]}),
        "p:3",
        base="s3://b/d",
    )
    assert text == TextSample(text="Just text.", source="p:1")
    assert isinstance(pair, PairSample) and pair.image == ImageItem("s3://b/d/a.png", None, 50176)
    assert isinstance(inter, InterleavedSample)
    assert inter.items == (TextItem("x"), ImageItem("s3://b/i.png"), VideoItem("s3://b/d/v.mp4"))


def test_agent_turns_use_the_tool_role() -> None:
    call = '{"function": "get_weather", "arguments": {"city": "Paris"}}'
    sample = parse_line(
        _line(
            {
                "messages": [
                    {"role": "user", "content": "Umbrella in Paris?"},
                    {"role": "assistant", "content": call},
                    {"role": "tool", "content": '{"sky": "rain"}'},
                    {"role": "assistant", "content": "Yes."},
                ]
            }
        ),
        "a:1",
    )
    assert [m.role for m in sample.messages] == ["user", "assistant", "tool", "assistant"]


def test_uri_resolution() -> None:
    assert resolve_uri("x/../y.png", "/d") == "/d/y.png"
    assert resolve_uri("y.png", "https://h/p") == "https://h/p/y.png"
    assert resolve_uri("simplecache::s3://b/k.png", "/d") == "simplecache::s3://b/k.png"
    assert resolve_uri("rel.png", None) == "rel.png"


OK_MSGS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
BAD_LINES = [
    ('{"text": "a"', r"f\.jsonl:9: invalid JSON"),
    ("[1, 2]", r"f\.jsonl:9: expected a JSON object, got a list"),
    (_line({"caption": "x"}), r"f\.jsonl:9: unknown sample kind"),
    (_line({"messages": []}), r"f\.jsonl:9: messages: expected a non-empty list"),
    (_line({"messages": [{"role": "bot", "content": "x"}]}), r"messages\[0\]\.role: unknown role 'bot'"),
    (_line({"messages": [{"role": "user"}]}), r"messages\[0\]\.content: missing"),
    (_line({"messages": [{"content": "x"}]}), r"messages\[0\]\.role: missing"),
    (
        _line({"messages": [{"role": "user", "content": 5}]}),
        r"messages\[0\]\.content: expected a string or a list",
    ),
    (_line({"messages": [{"role": "user", "content": "q"}]}), r"messages: no assistant turn"),
    (
        _line({"messages": [*OK_MSGS, {"role": "system", "content": "s"}]}),
        r"messages\[2\]\.role: 'system' is only",
    ),
    (
        _line({"messages": [_user_image("a", max_pixel=9), OK_MSGS[1]]}),
        r"messages\[0\]\.content\[0\]\.max_pixel: unknown field for an image item",
    ),
    (
        _line({"messages": [_user_image("a", min_pixels=2.5), OK_MSGS[1]]}),
        r"messages\[0\]\.content\[0\]\.min_pixels: expected a positive integer, got 2\.5",
    ),
    (
        _line({"messages": [_user_image("a", min_pixels=9, max_pixels=4), OK_MSGS[1]]}),
        r"messages\[0\]\.content\[0\]\.min_pixels: 9 exceeds max_pixels 4",
    ),
    (_line({"messages": [_user_image(""), OK_MSGS[1]]}), r"content\[0\]\.image: expected a non-empty URI"),
    (
        _line({"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}, OK_MSGS[1]]}),
        r"content\[0\]\.type: says 'image' but the item has a 'text' key",
    ),
    (
        _line({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}, OK_MSGS[1]]}),
        r"content\[0\]\.type: unknown item type",
    ),
    (
        _line({"messages": [{"role": "user", "content": [{"video": []}]}, OK_MSGS[1]]}),
        r"content\[0\]\.video: empty frame list",
    ),
    (
        _line({"messages": [OK_MSGS[0], {"role": "assistant", "content": [{"image": "x.png"}]}]}),
        r"messages\[1\]\.content\[0\]: assistant turns cannot hold images",
    ),
    (
        _line({"messages": [OK_MSGS[0], {"role": "assistant", "content": "a<|im_end|>"}]}),
        r"messages\[1\]\.content: text contains the reserved token '<\|im_end\|>'",
    ),
    (_line({"messages": OK_MSGS, "extra": 1}), r"f\.jsonl:9: extra: unknown field for a conversation sample"),
    (_line({"messages": OK_MSGS, "meta": [1]}), r"meta: expected an object, got a list"),
    (_line({"image": "a.png"}), r"text: missing \(an image-text pair needs a caption\)"),
    (_line({"image": 3, "text": "c"}), r"f\.jsonl:9: image: expected a non-empty URI string, got 3"),
    (_line({"text": "   "}), r"text: empty text"),
    (_line({"text": ["a"]}), r"text: expected a string, got a list"),
    (_line({"interleaved": [{"image": "a.png"}]}), r"interleaved: no text item"),
    (_line({"interleaved": [{"text": "a", "image": "b"}]}), r"interleaved\[0\]: expected exactly one of"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_errors_name_the_line_and_the_field(line: str, message: str) -> None:
    with pytest.raises(SampleError, match=message) as info:
        parse_line(line, "f.jsonl:9")
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value) and str(info.value).startswith("f.jsonl:9: ")


def test_iter_jsonl_counts_lines_and_reads_gzip(tmp_path: Path) -> None:
    lines = [_line({"text": "one"}), "", _line({"image": "i/a.png", "text": "c"}), '{"text": 3}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    samples = iter_jsonl(path)
    assert next(samples).source == f"{path}:1"
    pair = next(samples)
    assert pair.source == f"{path}:3" and pair.image.image == str(tmp_path / "i" / "a.png")
    with pytest.raises(SampleError, match=rf"^{path}:4: text: expected a string, got a number$"):
        next(samples)

    zipped = tmp_path / "z.jsonl.gz"
    zipped.write_bytes(gzip.compress(b'{"text": "zipped"}\n'))
    assert [s.text for s in iter_jsonl(zipped)] == ["zipped"]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(iter_jsonl(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------------------------------------
# encode_sample on synthetic data


@pytest.fixture(scope="module")
def tok() -> Qwen2VLTokenizer:
    return Qwen2VLTokenizer.builtin()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("synthetic")
    generate(str(dest), seed=3, num_images=3, num_videos=2, num_texts=2, image_size=224)
    return dest


def _video_fn(loaded: Any, item: VideoItem) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A small stand-in for the video module: every other frame, resized within the item's pixel budget."""
    with av.open(loaded) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)][::2]
    frames = frames[: len(frames) // 2 * 2]
    h, w = smart_resize(*frames[0].shape[:2], min_pixels=item.min_pixels, max_pixels=item.max_pixels)
    assert (h, w) == frames[0].shape[:2]  # the synthetic records ask for the native 112x112
    cfg = ImageProcessorConfig()
    x = np.stack(frames).transpose(0, 3, 1, 2).astype(np.float32) / 255
    x = (x - np.array(cfg.image_mean, np.float32)[:, None, None]) / np.array(cfg.image_std, np.float32)[
        :, None, None
    ]
    return patchify(x, cfg)


def _encode(sample: Any, tok: Qwen2VLTokenizer, **kwargs: Any) -> Any:
    return encode_sample(
        sample, tokenizer=tok, image_cfg=ImageProcessorConfig(), video_fn=_video_fn, **kwargs
    )


def _assert_pads_match_grids(encoded: Any) -> None:
    for pad, grids in ((IMAGE_PAD, encoded.image_grid_thw), (VIDEO_PAD, encoded.video_grid_thw)):
        expected = 0 if grids is None else int(grids.prod(-1).sum()) // 4
        assert int((encoded.input_ids == pad).sum()) == expected
    if encoded.pixel_values is not None:
        assert len(encoded.pixel_values) == int(encoded.image_grid_thw.prod(-1).sum())


def test_encode_grounding_conversation(data: Path, tok: Qwen2VLTokenizer) -> None:
    sample = next(iter_jsonl(data / "train" / "grounding.jsonl"))
    encoded = _encode(sample, tok, index=11)
    assert encoded.index == 11 and encoded.source == sample.source
    assert encoded.image_grid_thw.tolist() == [[1, 16, 16]]  # 224x224: 64 merged tokens
    assert encoded.pixel_values.shape == (256, 1176) and encoded.pixel_values.dtype == np.float32
    assert encoded.video_grid_thw is None and encoded.pixel_values_videos is None
    _assert_pads_match_grids(encoded)
    # Supervised: exactly the answer (grounding tokens included), <|im_end|> and "\n".
    supervised = encoded.labels[encoded.labels != IGNORE_INDEX]
    answer = sample.messages[-1].content
    assert supervised.tolist() == tok.encode(answer) + [IM_END, 198]
    assert tok.decode(encoded.input_ids).replace("<|image_pad|>" * 63, "") == render_chat(
        [
            {
                "role": m.role,
                "content": m.content
                if isinstance(m.content, str)
                else [{"image": "x"} if isinstance(i, ImageItem) else {"text": i.text} for i in m.content],
            }
            for m in sample.messages
        ]
    )


def test_encode_video_conversation(data: Path, tok: Qwen2VLTokenizer) -> None:
    sample = next(iter_jsonl(data / "train" / "video_qa.jsonl"))
    encoded = _encode(sample, tok)
    # 30 frames at 10 fps, every other one kept: 15 -> 14 frames, 7 temporal groups of 8x8 patches.
    assert encoded.video_grid_thw.tolist() == [[7, 8, 8]]
    assert encoded.pixel_values_videos.shape == (7 * 64, 1176)
    assert encoded.image_grid_thw is None
    _assert_pads_match_grids(encoded)
    assert encoded.num_vision_tokens == 7 * 16
    supervised = encoded.labels[encoded.labels != IGNORE_INDEX]
    assert tok.decode(supervised) == sample.meta["direction"] + "<|im_end|>\n"


def test_encode_pair_supervises_text_only(data: Path, tok: Qwen2VLTokenizer) -> None:
    sample = next(iter_jsonl(data / "train" / "captions.jsonl"))
    encoded = _encode(sample, tok)
    ids, labels = encoded.input_ids.tolist(), encoded.labels.tolist()
    assert ids == [VISION_START, *[IMAGE_PAD] * 64, VISION_END, *tok.encode(sample.text), ENDOFTEXT]
    assert labels == [IGNORE_INDEX] * 66 + ids[66:]
    _assert_pads_match_grids(encoded)


def test_encode_interleaved_and_text(data: Path, tok: Qwen2VLTokenizer) -> None:
    image = str(data / "train" / "images" / "img-000000.png")
    line = _line(
        {"interleaved": [{"text": "Before."}, {"image": image, "max_pixels": 112 * 112}, {"text": "After."}]}
    )
    encoded = _encode(parse_line(line, "i:1"), tok)
    assert encoded.image_grid_thw.tolist() == [[1, 8, 8]]  # the per-item budget shrinks 224x224 to 112x112
    before, after = tok.encode("Before."), tok.encode("After.")
    n = len(before)
    assert encoded.input_ids.tolist() == [
        *before,
        VISION_START,
        *[IMAGE_PAD] * 16,
        VISION_END,
        *after,
        ENDOFTEXT,
    ]
    assert encoded.labels.tolist() == [*before, *[IGNORE_INDEX] * 18, *after, ENDOFTEXT]
    assert encoded.labels[n : n + 18].tolist() == [IGNORE_INDEX] * 18

    text = _encode(next(iter_jsonl(data / "train" / "text.jsonl")), tok)
    assert text.labels.tolist() == text.input_ids.tolist() and text.input_ids[-1] == ENDOFTEXT
    assert text.pixel_values is None and text.image_grid_thw is None


def test_encode_errors_name_the_sample_and_item(tmp_path: Path, tok: Qwen2VLTokenizer) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    messages = [_user_image("ok.png"), _user_image("broken.png"), {"role": "assistant", "content": "a"}]
    messages[0]["content"][0] = {"text": "no image here"}
    path = tmp_path / "d.jsonl"
    path.write_text(
        _line({"messages": messages}) + "\n" + _line({"interleaved": [{"text": "a"}, {"video": "v.mp4"}]})
    )
    conversation, interleaved = iter_jsonl(path)
    with pytest.raises(
        SampleError, match=rf"^{path}:1: messages\[1\]\.content\[0\]: cannot load image .*broken"
    ):
        _encode(conversation, tok)
    with pytest.raises(SampleError, match=rf"^{path}:2: interleaved\[1\]: .*no video_fn"):
        encode_sample(interleaved, tokenizer=tok, image_cfg=ImageProcessorConfig())
