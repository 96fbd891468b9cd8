"""ChatML rendering against the official Qwen2-VL Instruct template, and SFT ids/labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trainer.data.chat import IGNORE_INDEX, render_chat, tokenize_chat
from trainer.data.tokenizer import (
    BOX_END,
    BOX_START,
    IM_END,
    IM_START,
    IMAGE_PAD,
    OBJECT_REF_END,
    OBJECT_REF_START,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    Qwen2VLTokenizer,
)

TEMPLATE_FILE = Path(__file__).parents[2] / "fixtures" / "qwen2-vl-instruct-chat-template.json"
ASSISTANT, NEWLINE = 77091, 198

GROUNDING = (
    "<|object_ref_start|>the red triangle<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
)

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "text_only": [{"role": "user", "content": "Hello!"}],
    "image_no_system": [
        {
            "role": "user",
            "content": [{"type": "image", "image": "a.jpg"}, {"type": "text", "text": "Describe."}],
        },
        {"role": "assistant", "content": "A cat on a mat."},
    ],
    "system_and_video": [
        {"role": "system", "content": "You watch videos."},
        {
            "role": "user",
            "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "What happens?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Someone juggles."}]},
    ],
    "grounding": [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "shapes.png"},
                {"type": "text", "text": "Find <|object_ref_start|>the red triangle<|object_ref_end|>."},
            ],
        },
        {"role": "assistant", "content": GROUNDING},
    ],
    "multi_turn_mixed": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image", "image": "1.png"},
                {"type": "text", "text": " and"},
                {"type": "image", "image": "2.png"},
            ],
        },
        {"role": "assistant", "content": "The first is brighter.\nThe second is larger."},
        {
            "role": "user",
            "content": [{"type": "video", "video": "clip.mp4"}, {"type": "image", "image": "3.png"}],
        },
        {"role": "assistant", "content": "In the video, 2 people; in the image, 3 dogs 🐕."},
        {"role": "user", "content": "Thanks!  \n\n"},
    ],
    "keys_without_type": [
        {
            "role": "user",
            "content": [
                {"image": "x.jpg"},
                {"image_url": {"url": "http://example.com/y.png"}},
                {"video": ["f1.jpg", "f2.jpg"]},
                {"text": "three things"},
            ],
        },
    ],
    "empty_contents": [
        {"role": "user", "content": []},
        {"role": "assistant", "content": ""},
    ],
    "unicode_and_whitespace": [
        {"role": "user", "content": "\n  leading newline, 中文，日本語 and tabs\t\t"},
        {"role": "assistant", "content": "Réponse  avec   espaces\r\net fin\n"},
    ],
    "no_messages": [],
}


@pytest.fixture(scope="module")
def tok() -> Qwen2VLTokenizer:
    return Qwen2VLTokenizer.builtin()


@pytest.fixture(scope="module")
def official() -> Any:
    """Render with transformers, exactly as `apply_chat_template(..., tokenize=False)` does."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    template = json.loads(TEMPLATE_FILE.read_text(encoding="utf-8"))["chat_template"]

    def render(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        rendered, _ = utils.render_jinja_template([messages], chat_template=template, **kwargs)
        return rendered[0]

    return render


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_official_template(
    official: Any, name: str, add_generation_prompt: bool, add_vision_id: bool
) -> None:
    messages = CONVERSATIONS[name]
    kwargs = {"add_generation_prompt": add_generation_prompt, "add_vision_id": add_vision_id}
    assert render_chat(messages, **kwargs) == official(messages, **kwargs)


def test_render_example_from_the_spec() -> None:
    content = [{"type": "image", "image": "a"}, {"type": "text", "text": "Describe this image."}]
    messages = [{"role": "user", "content": content}]
    assert render_chat(messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "Picture 1: <|vision_start|>" in render_chat(messages, add_vision_id=True)


def test_bad_messages() -> None:
    with pytest.raises(ValueError, match=r"messages\[0\]\.content\[1\]"):
        content = [{"type": "text", "text": "hi"}, {"type": "audio", "audio": "a"}]
        render_chat([{"role": "user", "content": content}])
    with pytest.raises(TypeError, match=r"messages\[1\]"):
        render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        render_chat([{"content": "a"}])


# ----------------------------------------------------------------------------------------------------------
# tokenize_chat


def _pads(messages: list[dict[str, Any]]) -> tuple[int, int]:
    text = render_chat(messages)
    return text.count("<|image_pad|>"), text.count("<|video_pad|>")


def _expected_labels(input_ids: list[int]) -> list[int]:
    """Independent rule: after each `<|im_start|>assistant\\n`, everything up to and including the
    `<|im_end|>` and its newline is supervised, except vision pads."""
    labels = [IGNORE_INDEX] * len(input_ids)
    i = 0
    while i < len(input_ids):
        if input_ids[i : i + 3] == [IM_START, ASSISTANT, NEWLINE]:
            j = i + 3
            while j < len(input_ids) and input_ids[j] != IM_END:
                j += 1
            for k in range(i + 3, min(j + 2, len(input_ids))):
                labels[k] = IGNORE_INDEX if input_ids[k] in (IMAGE_PAD, VIDEO_PAD) else input_ids[k]
            i = j
        i += 1
    return labels


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_ids_match_tokenized_render_and_labels(
    tok: Qwen2VLTokenizer, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    images, videos = _pads(messages)
    ids, labels = tokenize_chat(
        messages,
        tok,
        image_token_counts=[1] * images,
        video_token_counts=[1] * videos,
        add_generation_prompt=add_generation_prompt,
    )
    assert ids == tok.encode(render_chat(messages, add_generation_prompt=add_generation_prompt))
    assert len(labels) == len(ids)
    assert labels == _expected_labels(ids)
    if add_generation_prompt:
        assert ids[-3:] == [IM_START, ASSISTANT, NEWLINE]
        assert labels[-3:] == [IGNORE_INDEX] * 3


def test_supervised_tokens_are_exactly_the_replies(tok: Qwen2VLTokenizer) -> None:
    messages = CONVERSATIONS["multi_turn_mixed"]
    ids, labels = tokenize_chat(messages, tok, image_token_counts=[3, 5, 7], video_token_counts=[11])
    supervised = [label for label in labels if label != IGNORE_INDEX]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert supervised == [t for r in replies for t in [*tok.encode(r), IM_END, NEWLINE]]
    # Supervised positions carry their own input id (the shift happens in the loss).
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))


def test_grounding_reply_keeps_special_tokens_whole(tok: Qwen2VLTokenizer) -> None:
    ids, labels = tokenize_chat(CONVERSATIONS["grounding"], tok, image_token_counts=[4])
    supervised = [label for label in labels if label != IGNORE_INDEX]
    assert supervised[0] == OBJECT_REF_START
    assert supervised[-2:] == [IM_END, NEWLINE]
    for special in (OBJECT_REF_END, BOX_START, BOX_END):
        assert supervised.count(special) == 1
    assert tok.decode(supervised) == GROUNDING + "<|im_end|>\n"
    # The user's literal <|object_ref_start|> is one token too, and unsupervised.
    assert ids.count(OBJECT_REF_START) == 2


def test_pad_expansion(tok: Qwen2VLTokenizer) -> None:
    messages = CONVERSATIONS["multi_turn_mixed"]
    counts, video_counts = [64, 1, 16384], [1200]
    ids, labels = tokenize_chat(messages, tok, image_token_counts=counts, video_token_counts=video_counts)
    assert ids.count(IMAGE_PAD) == sum(counts) and ids.count(VIDEO_PAD) == sum(video_counts)
    # Each run sits between its vision markers, in conversation order.
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == VISION_START:
            j = ids.index(VISION_END, i)
            run = ids[i + 1 : j]
            assert len(set(run)) == 1
            runs.append((run[0], len(run)))
            i = j
        i += 1
    assert runs == [(IMAGE_PAD, 64), (IMAGE_PAD, 1), (VIDEO_PAD, 1200), (IMAGE_PAD, 16384)]
    # Collapsing the runs gives the unexpanded sequence; pads are never supervised.
    short, _ = tokenize_chat(messages, tok, image_token_counts=[1, 1, 1], video_token_counts=[1])
    collapsed = [t for k, t in enumerate(ids) if not (t in (IMAGE_PAD, VIDEO_PAD) and ids[k - 1] == t)]
    assert collapsed == short
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels, strict=True) if token == IMAGE_PAD)


def test_count_mismatch_names_the_kind(tok: Qwen2VLTokenizer) -> None:
    messages = CONVERSATIONS["multi_turn_mixed"]  # 3 images, 1 video
    with pytest.raises(ValueError, match="image_token_counts.*3 pad tokens but 2 counts"):
        tokenize_chat(messages, tok, image_token_counts=[4, 4], video_token_counts=[4])
    with pytest.raises(ValueError, match="image_token_counts.*more counts"):
        tokenize_chat(messages, tok, image_token_counts=[4] * 4, video_token_counts=[4])
    with pytest.raises(ValueError, match="video_token_counts.*1 pad tokens but 0 counts"):
        tokenize_chat(messages, tok, image_token_counts=[4] * 3)
    with pytest.raises(ValueError, match="positive"):
        tokenize_chat(messages, tok, image_token_counts=[4, 0, 4], video_token_counts=[4])
    with pytest.raises(ValueError, match="integers"):
        tokenize_chat(messages, tok, image_token_counts=[4, 2.5, 4], video_token_counts=[4])


def test_literal_pad_in_text_counts_like_the_processor(tok: Qwen2VLTokenizer) -> None:
    messages = [{"role": "user", "content": "see <|image_pad|> here"}]
    with pytest.raises(ValueError, match="image_token_counts"):
        tokenize_chat(messages, tok)
    ids, _ = tokenize_chat(messages, tok, image_token_counts=[3])
    assert ids.count(IMAGE_PAD) == 3


def test_vision_in_assistant_turn_is_not_supervised(tok: Qwen2VLTokenizer) -> None:
    messages = [
        {"role": "user", "content": "Show me."},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Here:"}, {"type": "image", "image": "i"}],
        },
    ]
    ids, labels = tokenize_chat(messages, tok, image_token_counts=[5])
    assert labels == _expected_labels(ids)
    pad_labels = [label for token, label in zip(ids, labels, strict=True) if token == IMAGE_PAD]
    assert pad_labels == [IGNORE_INDEX] * 5


def test_reply_starting_with_newline_is_tokenized_after_the_header(tok: Qwen2VLTokenizer) -> None:
    # The one case where ids differ from tokenizing the rendered string: "\n" + "\n\n" would merge.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nhello"}]
    ids, labels = tokenize_chat(messages, tok)
    header = ids.index(ASSISTANT) - 1
    assert ids[header : header + 3] == [IM_START, ASSISTANT, NEWLINE]
    assert ids[header + 3 :] == [*tok.encode("\n\nhello"), IM_END, NEWLINE]
    assert labels == _expected_labels(ids)
    assert tok.decode(ids) == render_chat(messages)
