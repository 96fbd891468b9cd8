"""ChatML rendering as the Qwen2-VL Instruct chat template does it, and SFT tokens with supervision labels.

Messages are dicts: `{"role": str, "content": str | list[item]}`. Items are `{"type": "text", "text": ...}`,
`{"type": "image", "image": uri}` (or an `image_url` key) and `{"type": "video", "video": uri}`; as in the
template, an `image`/`image_url`/`video` key marks a vision item even without `type`.

Decisions:

- `render_chat` does not run Jinja; it follows the published template step by step (default system
  prompt, `Picture k: ` / `Video k: ` numbering, generation prompt). The tests compare it with
  transformers' rendering of the official template. One deliberate difference: an item the template
  would drop without a trace (say `{"type": "audio"}`, or a text item with no `text`) raises ValueError,
  because dropping it quietly in training hides a data bug.
- `tokenize_chat` renders the same pieces, each marked supervised or not, joins neighbouring pieces that
  have the same mark, and encodes each run. Every special token is its own token, so splitting the text at
  them changes nothing. The one other split is between `<|im_start|>assistant\\n` and the reply: at inference
  the model continues after exactly those ids, so it should learn the reply tokenized on its own. This
  matches the official fine-tuning code (it masks the 3 header tokens of each assistant turn). It differs
  from tokenizing the whole rendered string only when a reply starts with a line break, which would merge
  with the header's `\\n`.
- Supervised: assistant content, its `<|im_end|>` and the `\\n` after it. Not supervised: system and user
  turns, every `<|im_start|>role\\n` header, and vision pad tokens anywhere, because the model's input there
  is a vision feature, not a token it could predict.
- Pad expansion happens on ids, not on text: each `<|image_pad|>` / `<|video_pad|>` id is repeated
  `counts[k]` times, so thousands of pads are never written out and re-tokenized. Like transformers'
  processor, this also counts pad tokens typed literally inside text.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

from trainer.data.tokenizer import IMAGE_PAD, VIDEO_PAD, Qwen2VLTokenizer

IGNORE_INDEX = -100
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ASSISTANT_ROLE = "assistant"

IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"

Message = Mapping[str, Any]
# (text, supervised): consecutive pieces of the rendered conversation.
_Piece = tuple[str, bool]


def _item_kind(item: Any, where: str) -> str:
    """'image', 'video' or 'text', checked in the template's order (an `image` key wins over `text`)."""
    if not isinstance(item, Mapping):
        raise TypeError(f"{where}: content items must be dicts, got {type(item).__name__}")
    kind = item.get("type")
    if kind == "image" or "image" in item or "image_url" in item:
        return "image"
    if kind == "video" or "video" in item:
        return "video"
    if "text" in item:
        return "text"
    raise ValueError(f"{where}: item is neither image, video nor text: {dict(item)!r}")


def _pieces(messages: Sequence[Message], add_generation_prompt: bool, add_vision_id: bool) -> list[_Piece]:
    pieces: list[_Piece] = []
    images = videos = 0
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: expected a dict with 'role' and 'content'")
        role = str(message["role"])
        if index == 0 and role != "system":
            pieces.append((f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n", False))
        supervised = role == ASSISTANT_ROLE
        pieces.append((f"<|im_start|>{role}\n", False))
        content = message["content"]
        if isinstance(content, str):
            pieces.append((content, supervised))
        elif isinstance(content, Sequence):
            for k, item in enumerate(content):
                kind = _item_kind(item, f"{where}.content[{k}]")
                if kind == "image":
                    images += 1
                    prefix = f"Picture {images}: " if add_vision_id else ""
                    pieces.append((prefix + IMAGE_BLOCK, supervised))
                elif kind == "video":
                    videos += 1
                    prefix = f"Video {videos}: " if add_vision_id else ""
                    pieces.append((prefix + VIDEO_BLOCK, supervised))
                else:
                    pieces.append((str(item["text"]), supervised))  # Jinja prints non-strings with str()
        else:
            raise TypeError(f"{where}: content must be a string or a list of items")
        pieces.append(("<|im_end|>\n", supervised))
    if add_generation_prompt:
        pieces.append(("<|im_start|>assistant\n", False))
    return pieces


def render_chat(
    messages: Sequence[Message], *, add_generation_prompt: bool = False, add_vision_id: bool = False
) -> str:
    """The text the Qwen2-VL Instruct chat template renders for `messages`."""
    return "".join(text for text, _ in _pieces(messages, add_generation_prompt, add_vision_id))


def _check_counts(name: str, pads: int, counts: Sequence[int]) -> list[int]:
    if pads != len(counts):
        more = "more pad tokens than counts" if pads > len(counts) else "more counts than pad tokens"
        raise ValueError(f"{name}: the conversation has {pads} pad tokens but {len(counts)} counts ({more})")
    try:
        checked = [operator.index(c) for c in counts]  # ints, numpy ints; not floats
    except TypeError as e:
        raise ValueError(f"{name}: counts must be integers, got {list(counts)}") from e
    if any(c < 1 for c in checked):
        raise ValueError(f"{name}: counts must be positive, got {checked}")
    return checked


def tokenize_chat(
    messages: Sequence[Message],
    tokenizer: Qwen2VLTokenizer,
    *,
    image_token_counts: Sequence[int] = (),
    video_token_counts: Sequence[int] = (),
    add_generation_prompt: bool = False,
    add_vision_id: bool = False,
) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX where not supervised) for one conversation.

    The k-th image's `<|image_pad|>` becomes `image_token_counts[k]` copies (the merged patch count,
    t*h*w / merge_size**2 of its grid); videos likewise with `video_token_counts`.
    """
    # Merge neighbouring pieces with the same supervision: they are tokenized together, exactly as
    # the rendered string would be.
    runs: list[_Piece] = []
    for text, supervised in _pieces(messages, add_generation_prompt, add_vision_id):
        if runs and runs[-1][1] == supervised:
            runs[-1] = (runs[-1][0] + text, supervised)
        elif text:
            runs.append((text, supervised))
    encoded = [(tokenizer.encode(text), supervised) for text, supervised in runs]

    image_pads = sum(ids.count(IMAGE_PAD) for ids, _ in encoded)
    video_pads = sum(ids.count(VIDEO_PAD) for ids, _ in encoded)
    image_counts = iter(_check_counts("image_token_counts", image_pads, image_token_counts))
    video_counts = iter(_check_counts("video_token_counts", video_pads, video_token_counts))

    input_ids: list[int] = []
    labels: list[int] = []
    for ids, supervised in encoded:
        if IMAGE_PAD not in ids and VIDEO_PAD not in ids:  # the common case stays in C-level list ops
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
            continue
        for token in ids:
            if token in (IMAGE_PAD, VIDEO_PAD):
                n = next(image_counts) if token == IMAGE_PAD else next(video_counts)
                input_ids += [token] * n
                labels += [IGNORE_INDEX] * n
            else:
                input_ids.append(token)
                labels.append(token if supervised else IGNORE_INDEX)
    return input_ids, labels
