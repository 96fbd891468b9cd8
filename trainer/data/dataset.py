"""JSONL datasets as a `SampleSource`: records from files, media from object storage, videos through the cache.

- Records are read once from local paths or any fsspec URL (the JSONL holds text and media URIs, not media, so
  it fits in memory) and parsed lazily; a malformed line is a bad sample, never a crash.
- Media go through one `MediaReader` per process (bounded concurrency, rate cap, retries). Videos check the
  decoded-video cache first, keyed by URI, content version (ETag or mtime and size) and sampling settings, so a
  cached remote video is not downloaded again.
- Costs (token counts and spans, what packing plans with) come from a cost index built once per dataset: every
  sample is encoded once and measured exactly, and the index is stored next to the cache keyed by the files'
  content and the preprocessing settings, so later runs and every rank reuse it. A sample that fails in the
  index pass is known bad: its reason is kept, and the loader counts it without decoding it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.bad_samples import classify, one_line
from trainer.data.formats import (
    LoadedMedia,
    Sample,
    VideoItem,
    encode_sample,
    is_url,
    jsonl_folder,
    media_items,
    parse_line,
    sample_file_not_found,
)
from trainer.data.image import ImageProcessorConfig
from trainer.data.source import SampleCost
from trainer.data.storage import MediaReader, StorageConfig
from trainer.data.text_corpus import TextCorpus
from trainer.data.tokenizer import Qwen2VLTokenizer, load_tokenizer
from trainer.data.types import EncodedSample
from trainer.data.video import VideoConfig, cache_key, preprocess_video
from trainer.data.video_cache import VideoCache, VideoCacheConfig

logger = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when what a cost means changes


@dataclass(kw_only=True, slots=True)
class DatasetConfig:
    paths: Sequence[str]  # JSONL files: local paths or fsspec URLs
    tokenizer: str | None = None  # a released tokenizer directory; None: the builtin Qwen2-VL tokenizer
    image: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cache_dir: str = ".cache/vlctl-data"  # cost index and decoded-video cache
    video_cache_bytes: int = 8 * 2**30

    def __post_init__(self) -> None:
        if isinstance(self.paths, str) or not self.paths:
            raise ValueError("paths: give a non-empty list of JSONL files")
        self.paths = [os.fspath(p) for p in self.paths]
        if self.video_cache_bytes < 0:
            raise ValueError(f"video_cache_bytes: must be >= 0, got {self.video_cache_bytes}")

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes what a sample encodes to."""
        return {
            "version": INDEX_VERSION,
            "tokenizer": self.tokenizer,
            "image": _plain(self.image),
            "video": _plain(self.video),
        }


def _plain(cfg: Any) -> Any:
    return json.loads(json.dumps(asdict(cfg), default=str))


def _read_lines(path: str, storage_options: dict[str, Any]) -> list[bytes]:
    import fsspec

    try:
        with fsspec.open(path, "rb", compression="infer", **storage_options) as stream:
            return stream.read().splitlines()
    except FileNotFoundError:
        raise sample_file_not_found(path) from None


class JsonlDataset:
    """A `SampleSource` over JSONL files; picklable into loader worker processes (each rebuilds its readers)."""

    def __init__(self, config: DatasetConfig):
        self.config = config
        self._records: list[tuple[bytes, str, str]] = []  # (line, "file:line", base folder for relative URIs)
        digest = hashlib.sha256(json.dumps(config.fingerprint(), sort_keys=True).encode())
        for path in config.paths:
            base = jsonl_folder(path)
            protocol = path.split("://", 1)[0] if is_url(path) else "file"
            for lineno, line in enumerate(_read_lines(path, config.storage.options_for(protocol)), start=1):
                digest.update(line + b"\n")
                if line.strip():
                    self._records.append((line, f"{path}:{lineno}", base))
        self.index_key = digest.hexdigest()[:24]
        self._costs: list[SampleCost | None] | None = None
        self._bad_reasons: dict[int, str] = {}
        self._runtime: _Runtime | None = None

    def __len__(self) -> int:
        return len(self._records)

    def __getstate__(self) -> dict[str, Any]:
        state = {k: getattr(self, k) for k in ("config", "_records", "index_key", "_costs", "_bad_reasons")}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._runtime = None

    # ------------------------------------------------------------------------------------------ SampleSource

    def cost(self, index: int) -> SampleCost | None:
        if self._costs is None:
            self.build_index()
        return self._costs[index]  # type: ignore[index]

    def bad_reason(self, index: int) -> str | None:
        """Why the index pass found this sample bad (the bad-sample counter it belongs to), or None."""
        if self._costs is None:
            self.build_index()
        return self._bad_reasons.get(index)

    def encode(self, index: int) -> EncodedSample:
        line, where, base = self._records[index]
        sample = parse_line(line, where, base=base)
        return self.runtime.encode(sample, index)

    def source_of(self, index: int) -> str:
        return self._records[index][1]

    # ------------------------------------------------------------------------------------------ cost index

    @property
    def index_path(self) -> Path:
        return Path(self.config.cache_dir) / "cost-index" / f"{self.index_key}.json"

    def build_index(self) -> None:
        """Load the cost index, or build it by encoding every sample once and store it atomically."""
        path = self.index_path
        if path.exists():
            stored = json.loads(path.read_text())
            self._costs = [None if c is None else _cost_from_json(c) for c in stored["costs"]]
            self._bad_reasons = {int(k): v for k, v in stored["bad"].items()}
            return
        costs: list[SampleCost | None] = []
        bad: dict[int, str] = {}
        for i in range(len(self)):
            try:
                costs.append(SampleCost.from_encoded(self.encode(i)))
            except (ValueError, OSError) as err:
                bad[i] = classify(err)
                costs.append(None)
                logger.warning("bad sample %s (%s): %s", self.source_of(i), bad[i], one_line(err))
        self._costs, self._bad_reasons = costs, bad
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(
            json.dumps(
                {
                    "costs": [None if c is None else _cost_to_json(c) for c in costs],
                    "bad": {str(k): v for k, v in bad.items()},
                }
            )
        )
        os.replace(tmp, path)

    @property
    def runtime(self) -> _Runtime:
        if self._runtime is None:
            self._runtime = _Runtime(self.config)
        return self._runtime


def _cost_to_json(cost: SampleCost) -> dict[str, Any]:
    return {"n": cost.num_tokens, "v": list(cost.vision_spans), "l": list(cost.label_spans), "s": cost.source}


def _cost_from_json(raw: dict[str, Any]) -> SampleCost:
    return SampleCost(
        num_tokens=raw["n"],
        vision_spans=tuple(map(tuple, raw["v"])),
        label_spans=tuple(map(tuple, raw["l"])),
        source=raw["s"],
    )


class _Runtime:
    """Per-process readers and caches (not pickled: each loader worker makes its own)."""

    def __init__(self, config: DatasetConfig):
        self.config = config
        self.tokenizer: Qwen2VLTokenizer = load_tokenizer(config.tokenizer)
        self.reader = MediaReader(config.storage)
        self.video_cache = (
            VideoCache(
                VideoCacheConfig(
                    root=str(Path(config.cache_dir) / "videos"), max_bytes=config.video_cache_bytes
                )
            )
            if config.video_cache_bytes
            else None
        )
        self._video_uris: set[str] = set()

    def encode(self, sample: Sample, index: int) -> EncodedSample:
        self._video_uris = {
            item.video
            for _, item in media_items(sample)
            if isinstance(item, VideoItem) and isinstance(item.video, str)
        }
        encoded = encode_sample(
            sample,
            tokenizer=self.tokenizer,
            image_cfg=self.config.image,
            load_media=self.load_media,
            video_fn=self.video,
            index=index,
        )
        encoded.source = sample.source
        return encoded

    def load_media(self, uri: str) -> LoadedMedia:
        if not is_url(uri):
            return uri  # decoders read local files themselves
        if uri in self._video_uris and self.video_cache is not None:
            return uri  # fetched in `video` only on a cache miss
        return self.reader.read(uri)

    def video(self, loaded: LoadedMedia | list[LoadedMedia], item: VideoItem):
        cfg = video_config_for(self.config.video, item)
        if isinstance(loaded, list) or self.video_cache is None:
            return preprocess_video(loaded, cfg)
        if isinstance(loaded, str) and is_url(loaded):
            version = self.reader.version(loaded)
            frames = self.video_cache.get(cache_key(loaded, version, cfg))
            if frames is None:
                return preprocess_video(
                    self.reader.read(loaded), cfg, cache=self.video_cache, uri=loaded, version=version
                )
            from trainer.data.video import frames_to_rows

            return frames_to_rows(frames, cfg)
        return preprocess_video(loaded, cfg, cache=self.video_cache)


def video_config_for(base: VideoConfig, item: VideoItem) -> VideoConfig:
    """The sample's own sampling fields over the dataset's video settings. `total_pixels` is a visual-token
    budget in pixels (28 x 28 per token), as in qwen-vl-utils; an explicit frame count is not supported."""
    from dataclasses import replace

    if item.nframes is not None:
        raise ValueError(f"video {item.video}: nframes is not supported; sample by fps instead")
    changes: dict[str, Any] = {}
    if item.min_pixels is not None:
        changes["min_pixels"] = item.min_pixels
    if item.max_pixels is not None:
        changes["max_pixels"] = item.max_pixels
    if item.fps is not None:
        changes["fps"] = item.fps
    if item.total_pixels is not None:
        factor = base.image.factor
        changes["max_video_tokens"] = max(1, item.total_pixels // (factor * factor))
    return replace(base, **changes) if changes else base


class CorpusSource:
    """A tokenized mmap text corpus as a `SampleSource`: costs and samples are read straight from the mapped
    files, so nothing is encoded twice and no document is loaded before it is trained on."""

    def __init__(self, corpus: TextCorpus):
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def cost(self, index: int) -> SampleCost | None:
        return SampleCost.from_encoded(self.corpus[index])

    def encode(self, index: int) -> EncodedSample:
        return self.corpus[index]


class ConcatSource:
    """Several sources as one, indexed one after another (e.g. a multimodal JSONL set and a text corpus)."""

    def __init__(self, sources: Sequence[Any]):
        if not sources:
            raise ValueError("sources: give at least one source")
        self.sources = list(sources)
        self._starts = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[Any, int]:
        k = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.sources[k], index - int(self._starts[k])

    def cost(self, index: int) -> SampleCost | None:
        source, local = self._locate(index)
        return source.cost(local)

    def bad_reason(self, index: int) -> str | None:
        source, local = self._locate(index)
        return source.bad_reason(local) if hasattr(source, "bad_reason") else None

    def encode(self, index: int) -> EncodedSample:
        source, local = self._locate(index)
        sample = source.encode(local)
        sample.index = index
        return sample
