"""JSONL datasets end to end: synthetic data plus every kind of bad sample, through the loader into training.

The bad samples are real: a missing local file, a missing object behind an HTTP server on 127.0.0.1 (404), a
corrupt PNG, a file PyAV cannot decode, a malformed JSON line and an image too large for a row.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import synthetic
from trainer.data.dataset import DatasetConfig, JsonlDataset
from trainer.data.loader import LoaderConfig, PackedLoader
from trainer.data.packing import PackingConfig
from trainer.data.storage import StorageConfig
from trainer.models.qwen2_vl import Qwen2VL
from trainer.models.qwen2_vl.config import Qwen2VLConfig, tiny_config

ROW_LEN = 384


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def media_server(tmp_path_factory):
    """A plain HTTP server on 127.0.0.1 serving a folder; anything not in it answers 404."""
    root = tmp_path_factory.mktemp("served")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _ask(image: str) -> str:
    return json.dumps(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}],
                },
                {"role": "assistant", "content": "A shape."},
            ]
        }
    )


@pytest.fixture(scope="module")
def dataset_files(tmp_path_factory, media_server):
    root = tmp_path_factory.mktemp("data")
    synthetic.generate(str(root / "syn"), seed=1, num_images=8, num_videos=2, num_texts=6)
    served, url = media_server
    Image.new("RGB", (64, 64), (10, 200, 10)).save(served / "green.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    Image.new("RGB", (560, 560), (200, 10, 10)).save(root / "huge.png")  # 400 image tokens > ROW_LEN
    video = json.dumps(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "video", "video": "broken.mp4"}, {"type": "text", "text": "Where?"}],
                },
                {"role": "assistant", "content": "Left."},
            ]
        }
    )
    bad = [
        _ask("does-not-exist.png"),  # missing (local)
        _ask(f"{url}/gone.png"),  # missing (object over HTTP: 404, not retried)
        _ask(f"{url}/green.png"),  # fine: fetched over HTTP
        _ask("corrupt.png"),  # corrupt_image
        video,  # undecodable_video
        '{"messages": [{"role": "user", "content": "unterminated',  # malformed JSON
        _ask("huge.png"),  # too long for a row with its vision kept whole
    ]
    (root / "bad.jsonl").write_text("\n".join(bad) + "\n")
    return sorted(str(p) for p in (root / "syn" / "train").glob("*.jsonl")) + [str(root / "bad.jsonl")]


def real_vocab_tiny() -> Qwen2VLConfig:
    small = tiny_config()
    small.text.vocab_size = 151936
    return Qwen2VLConfig(vision=small.vision, text=small.text, torch_dtype="float32")


def make_dataset(paths, cache: Path) -> JsonlDataset:
    storage = StorageConfig(max_retries=2, backoff_base_s=0.01)
    return JsonlDataset(DatasetConfig(paths=paths, cache_dir=str(cache), storage=storage))


def test_bad_samples_are_skipped_counted_and_training_goes_on(dataset_files, tmp_path, caplog):
    dataset = make_dataset(dataset_files, tmp_path / "cache")
    packing = PackingConfig(row_len=ROW_LEN)
    # One row per step, so exactly one epoch of steps sees every sample, bad ones included, once.
    config = LoaderConfig(rows_per_step=1, max_bad_fraction=0.5, min_samples_before_bad_check=0, seed=3)
    torch.manual_seed(0)
    model = Qwen2VL(real_vocab_tiny()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    with caplog.at_level(logging.WARNING), PackedLoader(dataset, packing=packing, config=config) as loader:
        rows_in_epoch = loader.stream.plan(0).num_rows
        for _, batch in zip(range(rows_in_epoch), loader, strict=False):
            out = model(**batch.inputs, return_logits=False)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.item())
        counters = loader.counters.as_dict()
    assert all(np.isfinite(losses)) and len(losses) >= 3
    assert counters["bad/missing"] == 2
    assert counters["bad/corrupt_image"] == 1
    assert counters["bad/undecodable_video"] == 1
    assert counters["bad/malformed"] == 1
    assert counters["bad/too_long"] == 1
    assert counters["samples_bad"] == 6
    assert counters["samples_trained"] == len(dataset) - 6
    logged = caplog.text
    for name in ("does-not-exist.png", "gone.png", "corrupt.png", "broken.mp4", "bad.jsonl:6"):
        assert name in logged


def test_cost_index_is_built_once_and_reused(dataset_files, tmp_path):
    first = make_dataset(dataset_files, tmp_path / "cache")
    first.build_index()
    assert first.index_path.exists()
    second = make_dataset(dataset_files, tmp_path / "cache")
    second.encode = None  # the index must come from disk, not from encoding again
    assert [second.cost(i) for i in range(len(second))] == [first.cost(i) for i in range(len(first))]
    assert second.bad_reason(len(second) - 2) == "malformed"


def test_remote_video_is_served_from_the_decoded_cache(media_server, tmp_path):
    served, url = media_server
    frames = synthetic.draw_moving_shape(np.random.default_rng(0), synthetic.SyntheticConfig())[0]
    (served / "moving.mp4").write_bytes(synthetic.encode_mp4(frames, fps=10))
    record = json.dumps(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "video",
                            "video": f"{url}/moving.mp4",
                            "min_pixels": 3136,
                            "max_pixels": 12544,
                        },
                        {"type": "text", "text": "Which way?"},
                    ],
                },
                {"role": "assistant", "content": "left"},
            ]
        }
    )
    (tmp_path / "v.jsonl").write_text(record + "\n")
    dataset = make_dataset([str(tmp_path / "v.jsonl")], tmp_path / "cache")
    first = dataset.encode(0)
    requests = dataset.runtime.reader.counters()["requests"]
    second = dataset.encode(0)
    assert np.array_equal(first.pixel_values_videos, second.pixel_values_videos)
    # The hit costs one HEAD for the content version and no download.
    assert dataset.runtime.reader.counters()["requests"] == requests + 1


def test_missing_jsonl_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make_dataset([str(tmp_path / "nope.jsonl")], tmp_path)


def test_text_corpus_and_jsonl_train_together(dataset_files, tmp_path):
    """A mmap text corpus and a multimodal JSONL set behind one loader; corpus samples come from the map."""
    from trainer.data.dataset import ConcatSource, CorpusSource
    from trainer.data.formats import iter_jsonl
    from trainer.data.text_corpus import TextCorpus, build_corpus
    from trainer.data.tokenizer import load_tokenizer

    syn_text = [p for p in dataset_files if p.endswith("text.jsonl")]
    build_corpus(iter_jsonl(syn_text[0]), str(tmp_path / "corpus"), tokenizer=load_tokenizer())
    corpus = TextCorpus(str(tmp_path / "corpus"))
    assert isinstance(corpus.tokens, np.memmap)
    images = make_dataset([p for p in dataset_files if p.endswith("captions.jsonl")], tmp_path / "cache")
    source = ConcatSource([images, CorpusSource(corpus)])
    assert len(source) == len(images) + len(corpus)
    last = source.encode(len(source) - 1)
    assert last.index == len(source) - 1
    assert np.array_equal(last.input_ids, corpus.ids(len(corpus) - 1))
    loader = PackedLoader(source, packing=PackingConfig(row_len=256), config=LoaderConfig(rows_per_step=2))
    batch = next(iter(loader))
    assert batch.inputs["input_ids"].shape == (2, 256)
    loader.close()
