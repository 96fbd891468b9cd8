"""The JSONL sample format: parse and validate records into typed samples, and encode them for the model.

One JSON object per line, of one of four kinds (docs/data-format.md has examples of each):

    {"messages": [{"role": ..., "content": str | [item, ...]}, ...]}     conversation (SFT, ChatML)
    {"text": "..."}                                                    plain text document (pretraining)
    {"image": URI, "text": "caption"}                                  image-text pair (pretraining)
    {"interleaved": [{"text": ...}, {"image": URI}, ...]}              interleaved document (pretraining)

Items are `{"type": "text", "text": ...}`, `{"type": "image", "image": URI}` and
`{"type": "video", "video": URI | [frame URI, ...]}`; `type` may be left out, since the key already says it.
Every kind may also carry `"id"` (string or integer) and `"meta"` (any object, e.g. ground truth for evaluation),
which training ignores.

Decisions:

- Strict: an unknown key, a wrong type, an unknown role or an empty document is a `SampleError` naming
  `file:line` and the field (`train.jsonl:12: messages[1].content[0].image: ...`). A typo such as `"max_pixel"`
  would otherwise be dropped without a trace and silently change what the model sees.
- Roles: system, user, assistant and tool. The chat template prints any role verbatim; we accept `tool` for
  function-call observations (agent data) and reject other names as likely typos. `system` only as the first
  message; images and videos only in user and tool turns (the model cannot generate them); at least one
  assistant turn, or the conversation would supervise nothing.
- Text may contain grounding tokens (`<|box_start|>`...) but no ChatML or vision token: a literal `<|im_end|>`
  or `<|image_pad|>` in the data would break the turn structure or the pad/feature alignment.
- Relative local paths resolve against the JSONL file's folder (also when that folder is a URL); `file://`
  URIs become plain local paths; other URLs (s3://, http(s)://, fsspec chains with `::`) are kept as written.
- Pretraining kinds render without chat roles, as the base models' format does: text, and vision blocks
  `<|vision_start|><|image_pad|>*n<|vision_end|>`, followed by `<|endoftext|>`. Only text tokens are supervised
  (reference §12.2), `<|endoftext|>` included so the model learns where documents end; never pads or wrappers.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from trainer.data.chat import IGNORE_INDEX, tokenize_chat
from trainer.data.tokenizer import ENDOFTEXT, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, Qwen2VLTokenizer
from trainer.data.types import EncodedSample

if TYPE_CHECKING:  # image.py imports torch; parsing and text-only encoding should not need it
    from trainer.data.image import ImageProcessorConfig

ROLES = ("system", "user", "assistant", "tool")
VISION_ROLES = frozenset({"user", "tool"})
# Tokens that must not appear literally in data text (grounding tokens are allowed: they are the point).
RESERVED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_RESERVED = re.compile("|".join(re.escape(t) for t in RESERVED_TOKENS))
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")

_COMMON_KEYS = frozenset({"id", "meta"})
_IMAGE_KEYS = frozenset({"type", "image", "min_pixels", "max_pixels"})
_VIDEO_KEYS = frozenset({"type", "video", "min_pixels", "max_pixels", "total_pixels", "fps", "nframes"})
_TEXT_KEYS = frozenset({"type", "text"})


class SampleError(ValueError):
    """A record that is not a valid sample; the message is one line: `file:line: field: problem`."""


@dataclass(frozen=True, slots=True)
class TextItem:
    text: str


@dataclass(frozen=True, slots=True)
class ImageItem:
    image: str  # resolved URI
    min_pixels: int | None = None  # overrides the image processor's pixel budget for this image
    max_pixels: int | None = None


@dataclass(frozen=True, slots=True)
class VideoItem:
    """A video file, or its frames as image URIs. The sampling fields are read by the video function."""

    video: str | tuple[str, ...]
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None
    fps: float | None = None
    nframes: int | None = None


ContentItem = TextItem | ImageItem | VideoItem
MediaItem = ImageItem | VideoItem


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str | tuple[ContentItem, ...]


@dataclass(kw_only=True, slots=True)
class _SampleBase:
    source: str = ""  # file:line, for error messages and logs
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class ConversationSample(_SampleBase):
    messages: tuple[Message, ...]
    kind = "conversation"


@dataclass(kw_only=True, slots=True)
class TextSample(_SampleBase):
    text: str
    kind = "text"


@dataclass(kw_only=True, slots=True)
class PairSample(_SampleBase):
    image: ImageItem
    text: str
    kind = "pair"


@dataclass(kw_only=True, slots=True)
class InterleavedSample(_SampleBase):
    items: tuple[ContentItem, ...]
    kind = "interleaved"


Sample = ConversationSample | TextSample | PairSample | InterleavedSample


def is_url(uri: str) -> bool:
    """True for scheme://... and fsspec chains (`simplecache::s3://...`); False for local paths."""
    return bool(_URL.match(uri)) or "::" in uri


def resolve_uri(uri: str, base: str | None) -> str:
    """Resolve a media URI written in a JSONL file whose folder is `base` (a local folder or a URL)."""
    if uri.startswith("file://"):
        return url2pathname(urlparse(uri).path)
    if is_url(uri) or os.path.isabs(uri) or base is None:
        return uri
    if is_url(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, uri))}"
    return os.path.normpath(os.path.join(base, uri))


def jsonl_folder(path: str | os.PathLike[str]) -> str:
    """The folder relative media paths in the JSONL file at `path` resolve against."""
    path = os.fspath(path)
    if is_url(path):
        return path.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


def sample_file_not_found(path: str | os.PathLike[str]) -> FileNotFoundError:
    """The error for a missing JSONL file; a relative path also names where it was looked for."""
    name = os.fspath(path)
    where = "" if is_url(name) or os.path.isabs(name) else f" (looked for {os.path.abspath(name)})"
    return FileNotFoundError(f"sample file not found: {name}{where}")


class _Parser:
    """Validation with error messages prefixed by the record's source."""

    def __init__(self, source: str, base: str | None) -> None:
        self.source = source
        self.base = base

    def fail(self, where: str, problem: str) -> SampleError:
        return SampleError(f"{self.source}: {where}: {problem}" if where else f"{self.source}: {problem}")

    def check_keys(self, obj: Mapping[str, Any], allowed: frozenset[str], where: str, what: str) -> None:
        for key in obj:
            if key not in allowed:
                raise self.fail(
                    _field(where, key), f"unknown field for {what} (allowed: {', '.join(sorted(allowed))})"
                )

    def text(self, value: Any, where: str, *, nonempty: bool = False) -> str:
        if not isinstance(value, str):
            raise self.fail(where, f"expected a string, got {_json_type(value)}")
        if nonempty and not value.strip():
            raise self.fail(where, "empty text")
        if reserved := _RESERVED.search(value):
            raise self.fail(where, f"text contains the reserved token {reserved.group()!r}")
        return value

    def uri(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected a non-empty URI string, got {_json_repr(value)}")
        return resolve_uri(value, self.base)

    def positive(self, obj: Mapping[str, Any], key: str, where: str, *, real: bool = False) -> Any:
        value = obj.get(key)
        if value is None:
            return None
        kinds = int | float if real else int
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            raise self.fail(
                _field(where, key),
                f"expected a positive {'number' if real else 'integer'}, got {_json_repr(value)}",
            )
        return float(value) if real else value

    def item(self, obj: Any, where: str) -> ContentItem:
        if not isinstance(obj, Mapping):
            raise self.fail(where, f"expected an object, got {_json_type(obj)}")
        present = [k for k in ("text", "image", "video") if k in obj]
        declared = obj.get("type")
        if declared is not None and declared not in ("text", "image", "video"):
            raise self.fail(
                f"{where}.type", f"unknown item type {_json_repr(declared)} (expected text, image or video)"
            )
        if len(present) != 1:
            raise self.fail(
                where, f"expected exactly one of 'text', 'image', 'video', got keys {sorted(obj)}"
            )
        kind = present[0]
        if declared is not None and declared != kind:
            raise self.fail(f"{where}.type", f"says {declared!r} but the item has a {kind!r} key")
        if kind == "text":
            self.check_keys(obj, _TEXT_KEYS, where, "a text item")
            return TextItem(self.text(obj["text"], f"{where}.text"))
        if kind == "image":
            self.check_keys(obj, _IMAGE_KEYS, where, "an image item")
            return ImageItem(self.uri(obj["image"], f"{where}.image"), *self.pixel_budget(obj, where))
        self.check_keys(obj, _VIDEO_KEYS, where, "a video item")
        video = obj["video"]
        if isinstance(video, list):
            if not video:
                raise self.fail(f"{where}.video", "empty frame list")
            source: str | tuple[str, ...] = tuple(
                self.uri(frame, f"{where}.video[{k}]") for k, frame in enumerate(video)
            )
        else:
            source = self.uri(video, f"{where}.video")
        return VideoItem(
            source,
            *self.pixel_budget(obj, where),
            total_pixels=self.positive(obj, "total_pixels", where),
            fps=self.positive(obj, "fps", where, real=True),
            nframes=self.positive(obj, "nframes", where),
        )

    def pixel_budget(self, obj: Mapping[str, Any], where: str) -> tuple[int | None, int | None]:
        low, high = self.positive(obj, "min_pixels", where), self.positive(obj, "max_pixels", where)
        if low is not None and high is not None and low > high:
            raise self.fail(_field(where, "min_pixels"), f"{low} exceeds max_pixels {high}")
        return low, high

    def message(self, obj: Any, where: str, first: bool) -> Message:
        if not isinstance(obj, Mapping):
            raise self.fail(where, f"expected an object with 'role' and 'content', got {_json_type(obj)}")
        for key in ("role", "content"):
            if key not in obj:
                raise self.fail(f"{where}.{key}", "missing")
        self.check_keys(obj, frozenset({"role", "content"}), where, "a message")
        role = obj["role"]
        if role not in ROLES:
            raise self.fail(
                f"{where}.role", f"unknown role {_json_repr(role)} (expected one of {', '.join(ROLES)})"
            )
        if role == "system" and not first:
            raise self.fail(f"{where}.role", "'system' is only allowed as the first message")
        content = obj["content"]
        if isinstance(content, str):
            return Message(role, self.text(content, f"{where}.content"))
        if not isinstance(content, list):
            raise self.fail(
                f"{where}.content", f"expected a string or a list of items, got {_json_type(content)}"
            )
        if not content:
            raise self.fail(f"{where}.content", "empty list")
        items = tuple(self.item(item, f"{where}.content[{k}]") for k, item in enumerate(content))
        if role not in VISION_ROLES:
            for k, item in enumerate(items):
                if not isinstance(item, TextItem):
                    raise self.fail(f"{where}.content[{k}]", f"{role} turns cannot hold images or videos")
        return Message(role, items)

    def sample(self, obj: Any) -> Sample:
        if not isinstance(obj, Mapping):
            raise self.fail("", f"expected a JSON object, got {_json_type(obj)}")
        common: dict[str, Any] = {"source": self.source, "id": self.identifier(obj), "meta": self.meta(obj)}
        if "messages" in obj:
            self.check_keys(obj, _COMMON_KEYS | {"messages"}, "", "a conversation sample")
            messages = obj["messages"]
            if not isinstance(messages, list) or not messages:
                raise self.fail(
                    "messages", f"expected a non-empty list of messages, got {_json_repr(messages)}"
                )
            parsed = tuple(self.message(m, f"messages[{k}]", k == 0) for k, m in enumerate(messages))
            if not any(m.role == "assistant" for m in parsed):
                raise self.fail("messages", "no assistant turn: nothing would be supervised")
            return ConversationSample(messages=parsed, **common)
        if "interleaved" in obj:
            self.check_keys(obj, _COMMON_KEYS | {"interleaved"}, "", "an interleaved sample")
            raw = obj["interleaved"]
            if not isinstance(raw, list) or not raw:
                raise self.fail("interleaved", f"expected a non-empty list of items, got {_json_repr(raw)}")
            items = tuple(self.item(item, f"interleaved[{k}]") for k, item in enumerate(raw))
            if not any(isinstance(item, TextItem) and item.text.strip() for item in items):
                raise self.fail("interleaved", "no text item: nothing would be supervised")
            return InterleavedSample(items=items, **common)
        if "image" in obj:
            self.check_keys(
                obj, _COMMON_KEYS | {"image", "text", "min_pixels", "max_pixels"}, "", "a pair sample"
            )
            if "text" not in obj:
                raise self.fail("text", "missing (an image-text pair needs a caption)")
            image = ImageItem(self.uri(obj["image"], "image"), *self.pixel_budget(obj, ""))
            return PairSample(image=image, text=self.text(obj["text"], "text", nonempty=True), **common)
        if "text" in obj:
            self.check_keys(obj, _COMMON_KEYS | {"text"}, "", "a text sample")
            return TextSample(text=self.text(obj["text"], "text", nonempty=True), **common)
        raise self.fail(
            "",
            f"unknown sample kind: expected a 'messages', 'text', 'image' or 'interleaved' key, "
            f"got keys {sorted(obj)}",
        )

    def identifier(self, obj: Mapping[str, Any]) -> str | None:
        value = obj.get("id")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.fail("id", f"expected a string or an integer, got {_json_type(value)}")
        return str(value)

    def meta(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        value = obj.get("meta", {})
        if not isinstance(value, dict):
            raise self.fail("meta", f"expected an object, got {_json_type(value)}")
        return value


def _field(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def _json_repr(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_record(obj: Any, source: str, *, base: str | None = None) -> Sample:
    """Validate an already decoded JSON value; relative media paths resolve against `base`."""
    return _Parser(source, base).sample(obj)


def parse_line(line: str | bytes, source: str, *, base: str | None = None) -> Sample:
    """Parse one JSONL line; `source` (usually `file:line`) prefixes every error message."""
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as e:
        raise SampleError(f"{source}: not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise SampleError(f"{source}: invalid JSON: {e.msg} (column {e.colno})") from None
    return parse_record(obj, source, base=base)


def iter_jsonl(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> Iterator[Sample]:
    """Samples of a JSONL file (local path or any fsspec URL; `.gz` etc. decompressed), blank lines skipped."""
    import fsspec

    name = os.fspath(path)
    base = jsonl_folder(name)
    try:
        opened = fsspec.open(name, "rb", compression="infer", **dict(storage_options or {}))
        with opened as stream:
            for lineno, line in enumerate(stream, start=1):
                if line.strip():
                    yield parse_line(line, f"{name}:{lineno}", base=base)
    except FileNotFoundError:
        raise sample_file_not_found(name) from None


def media_items(sample: Sample) -> list[tuple[str, MediaItem]]:
    """(field path, item) of every image and video in the sample, in the order they appear in the tokens."""
    if isinstance(sample, PairSample):
        return [("image", sample.image)]
    if isinstance(sample, InterleavedSample):
        return [
            (f"interleaved[{k}]", it) for k, it in enumerate(sample.items) if not isinstance(it, TextItem)
        ]
    if isinstance(sample, ConversationSample):
        return [
            (f"messages[{i}].content[{k}]", item)
            for i, message in enumerate(sample.messages)
            if not isinstance(message.content, str)
            for k, item in enumerate(message.content)
            if not isinstance(item, TextItem)
        ]
    return []


def messages_as_dicts(sample: ConversationSample) -> list[dict[str, Any]]:
    """The conversation in the dict form `trainer.data.chat` renders."""
    out: list[dict[str, Any]] = []
    for message in sample.messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        items: list[dict[str, Any]] = []
        for item in message.content:
            if isinstance(item, TextItem):
                items.append({"type": "text", "text": item.text})
            elif isinstance(item, ImageItem):
                items.append({"type": "image", "image": item.image})
            else:
                items.append({"type": "video", "video": item.video})
        out.append({"role": message.role, "content": items})
    return out


# ----------------------------------------------------------------------------------------------------------
# Encoding: Sample -> EncodedSample

# What `load_media` returns: a local path or the encoded bytes.
LoadedMedia = str | os.PathLike[str] | bytes
LoadMedia = Callable[[str], LoadedMedia]
# (loaded video, or its loaded frames; the item with its sampling fields) -> (pixel rows, (t, h, w) grid).
VideoFn = Callable[[LoadedMedia | list[LoadedMedia], VideoItem], tuple[np.ndarray, tuple[int, int, int]]]


def read_media(uri: str, **storage_options: Any) -> LoadedMedia:
    """Default `load_media`: a local path as it is (decoders read files directly), anything else as bytes
    fetched through fsspec."""
    if not is_url(uri):
        return uri
    import fsspec

    with fsspec.open(uri, "rb", **storage_options) as stream:
        return stream.read()


def tokenize_pretraining(
    items: Sequence[ContentItem],
    tokenizer: Qwen2VLTokenizer,
    *,
    image_token_counts: Sequence[int] = (),
    video_token_counts: Sequence[int] = (),
) -> tuple[list[int], list[int]]:
    """Ids and labels of a document without chat roles: text, vision blocks, `<|endoftext|>`; text supervised."""
    images, videos = iter(image_token_counts), iter(video_token_counts)
    ids: list[int] = []
    labels: list[int] = []
    for item in items:
        if isinstance(item, TextItem):
            text_ids = tokenizer.encode(item.text)
            ids += text_ids
            labels += text_ids
            continue
        pad, count = (IMAGE_PAD, next(images)) if isinstance(item, ImageItem) else (VIDEO_PAD, next(videos))
        ids += [VISION_START, *[pad] * count, VISION_END]
        labels += [IGNORE_INDEX] * (count + 2)
    ids.append(ENDOFTEXT)
    labels.append(ENDOFTEXT)
    return ids, labels


def _load(load_media: LoadMedia, uri: str) -> LoadedMedia:
    loaded = load_media(uri)
    if not isinstance(loaded, str | bytes | os.PathLike):
        raise TypeError(f"load_media returned {type(loaded).__name__}, expected a path or bytes")
    return loaded


def _encode_video(
    item: VideoItem, load_media: LoadMedia, video_fn: VideoFn
) -> tuple[np.ndarray, tuple[int, int, int]]:
    if isinstance(item.video, tuple):
        loaded: LoadedMedia | list[LoadedMedia] = [_load(load_media, frame) for frame in item.video]
    else:
        loaded = _load(load_media, item.video)
    rows, grid = video_fn(loaded, item)
    t, h, w = (int(v) for v in grid)
    if rows.ndim != 2 or rows.shape[0] != t * h * w:
        raise ValueError(f"video_fn returned {rows.shape} pixel rows for grid {(t, h, w)}")
    return rows, (t, h, w)


def encode_sample(
    sample: Sample,
    *,
    tokenizer: Qwen2VLTokenizer,
    image_cfg: ImageProcessorConfig,
    load_media: LoadMedia = read_media,
    video_fn: VideoFn | None = None,
    index: int = 0,
) -> EncodedSample:
    """Tokenize a sample and preprocess its images and videos. A media item that cannot be loaded or decoded
    raises SampleError naming the sample's source and the item's field."""
    from trainer.data.image import preprocess_image

    merge = image_cfg.merge_size**2
    image_rows: list[np.ndarray] = []
    image_grids: list[tuple[int, int, int]] = []
    video_rows: list[np.ndarray] = []
    video_grids: list[tuple[int, int, int]] = []
    for where, item in media_items(sample):
        try:
            if isinstance(item, ImageItem):
                source = _load(load_media, item.image)
                rows, grid = preprocess_image(
                    source, image_cfg, min_pixels=item.min_pixels, max_pixels=item.max_pixels
                )
                image_rows.append(rows)
                image_grids.append(grid)
            else:
                if video_fn is None:
                    raise ValueError("the sample has a video but no video_fn was given")
                rows, grid = _encode_video(item, load_media, video_fn)
                video_rows.append(rows)
                video_grids.append(grid)
        except (OSError, ValueError, TypeError) as e:
            raise SampleError(f"{sample.source}: {where}: {_one_line(e)}") from e
    image_counts = [t * h * w // merge for t, h, w in image_grids]
    video_counts = [t * h * w // merge for t, h, w in video_grids]

    if isinstance(sample, ConversationSample):
        ids, labels = tokenize_chat(
            messages_as_dicts(sample),
            tokenizer,
            image_token_counts=image_counts,
            video_token_counts=video_counts,
        )
    else:
        items = (
            (TextItem(sample.text),)
            if isinstance(sample, TextSample)
            else (sample.image, TextItem(sample.text))
            if isinstance(sample, PairSample)
            else sample.items
        )
        ids, labels = tokenize_pretraining(
            items, tokenizer, image_token_counts=image_counts, video_token_counts=video_counts
        )
    return EncodedSample(
        index=index,
        input_ids=np.asarray(ids, dtype=np.int64),
        labels=np.asarray(labels, dtype=np.int64),
        pixel_values=np.concatenate(image_rows) if image_rows else None,
        image_grid_thw=np.asarray(image_grids, dtype=np.int64).reshape(-1, 3) if image_grids else None,
        pixel_values_videos=np.concatenate(video_rows) if video_rows else None,
        video_grid_thw=np.asarray(video_grids, dtype=np.int64).reshape(-1, 3) if video_grids else None,
        source=sample.source,
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
