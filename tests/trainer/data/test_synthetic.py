"""Synthetic data: byte-identical for a seed, answers that match what was drawn (checked on the decoded PNG and
MP4 files), records in the sample format, and writing through fsspec (memory://, and S3 served by moto on
127.0.0.1)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import fsspec
import numpy as np
import pytest
from PIL import Image

from trainer.data.formats import ConversationSample, PairSample, iter_jsonl
from trainer.data.grounding import normalize_box, parse_boxes
from trainer.data.synthetic import SHAPE_COLORS, SyntheticConfig, generate, main

REPO_ROOT = Path(__file__).resolve().parents[3]
SMALL = {"seed": 5, "num_images": 12, "num_videos": 4, "num_texts": 10}


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("syn") / "data"
    generate(str(dest), **SMALL)
    return dest


def test_same_seed_gives_identical_bytes(data: Path, tmp_path: Path) -> None:
    generate(str(tmp_path / "again"), **SMALL)
    first, again = _tree(data), _tree(tmp_path / "again")
    assert first == again
    assert {"manifest.json", "train/captions.jsonl", "val/video_qa.jsonl", "val/text.jsonl"} <= set(first)
    generate(str(tmp_path / "other"), **{**SMALL, "seed": 6})
    other = _tree(tmp_path / "other")
    assert (
        other.keys() == first.keys()
        and other["train/images/img-000000.png"] != first["train/images/img-000000.png"]
    )


def test_videos_do_not_depend_on_what_memory_held_before(data: Path) -> None:
    """libx264's macroblock tree read memory before writing it: the same frames gave other bytes once the heap
    held something else (CI saw it after torch, DeepSpeed and transformers were imported in the same process).
    MALLOC_PERTURB_ fills every allocation with a given byte: two fillings must give this process's bytes."""
    script = (
        "import sys; from trainer.data.synthetic import generate; "
        "generate(sys.argv[1], seed=5, num_images=0, num_videos=4, num_texts=0)"
    )
    for fill in ("1", "200"):
        dest = data.parent / f"perturbed-{fill}"
        env = {**os.environ, "MALLOC_PERTURB_": fill}
        subprocess.run(
            [sys.executable, "-c", script, str(dest)], check=True, env=env, cwd=REPO_ROOT, timeout=120
        )
        videos = sorted(dest.glob("*/videos/*.mp4"))
        assert len(videos) == 4
        for path in videos:
            relative = path.relative_to(dest)
            assert path.read_bytes() == (data / relative).read_bytes(), (fill, str(relative))


def test_items_do_not_depend_on_the_other_counts(data: Path, tmp_path: Path) -> None:
    generate(str(tmp_path / "more"), **{**SMALL, "num_images": 20, "num_videos": 0})
    for name in ("img-000000.png", "img-000007.png"):
        assert (tmp_path / "more/train/images" / name).read_bytes() == (
            data / "train/images" / name
        ).read_bytes()


def test_splits_and_manifest(data: Path) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["config"]["seed"] == 5
    assert manifest["files"] == {
        "train/captions.jsonl": 11,
        "train/grounding.jsonl": 11,
        "train/video_qa.jsonl": 3,
        "train/text.jsonl": 9,
        "val/captions.jsonl": 1,
        "val/grounding.jsonl": 1,
        "val/video_qa.jsonl": 1,
        "val/text.jsonl": 1,
    }
    assert [s.id for s in iter_jsonl(data / "val" / "captions.jsonl")] == ["img-000011"]


def _color_bbox(pixels: np.ndarray, color: str) -> list[int]:
    ys, xs = np.nonzero((pixels == SHAPE_COLORS[color]).all(-1))
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_captions_and_boxes_match_the_pixels(data: Path) -> None:
    for split in ("train", "val"):
        for pair in iter_jsonl(data / split / "captions.jsonl"):
            assert isinstance(pair, PairSample)
            pixels = np.asarray(Image.open(pair.image.image).convert("RGB"))
            assert pixels.shape == (224, 224, 3)
            for shape in pair.meta["shapes"]:
                assert f"{shape['color']} {shape['shape']}" in pair.text
                assert _color_bbox(pixels, shape["color"]) == shape["box_px"]
        for sample in iter_jsonl(data / split / "grounding.jsonl"):
            assert isinstance(sample, ConversationSample)
            image, question = sample.messages[0].content
            meta = sample.meta
            assert question.text == f"Where is {meta['phrase']}?"
            color = meta["phrase"].split()[1]
            pixels = np.asarray(Image.open(image.image).convert("RGB"))
            assert _color_bbox(pixels, color) == meta["box_px"]
            assert list(normalize_box(meta["box_px"], 224, 224)) == meta["box"]
            (answer,) = parse_boxes(sample.messages[1].content)
            assert answer.phrase == meta["phrase"] and list(answer.box) == meta["box"]


def _centroid(frame: np.ndarray, color: str) -> np.ndarray:
    # The video is lossy: match colours approximately.
    near = np.abs(frame.astype(int) - SHAPE_COLORS[color]).sum(-1) < 90
    ys, xs = np.nonzero(near)
    assert len(xs) > 50
    return np.array([xs.mean(), ys.mean()])


def test_videos_move_the_way_the_answer_says(data: Path) -> None:
    samples = [*iter_jsonl(data / "train" / "video_qa.jsonl"), *iter_jsonl(data / "val" / "video_qa.jsonl")]
    assert len(samples) == 4
    for sample in samples:
        video, question = sample.messages[0].content
        meta = sample.meta
        assert video.min_pixels == 784 and video.max_pixels == 112 * 112
        assert f"the {meta['color']} {meta['shape']} move?" in question.text
        assert sample.messages[1].content == meta["direction"]
        with av.open(video.video) as container:
            stream = container.streams.video[0]
            assert (stream.width, stream.height, stream.average_rate) == (112, 112, 10)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == meta["frames"] == 30
        dx, dy = _centroid(frames[-1], meta["color"]) - _centroid(frames[0], meta["color"])
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}[meta["direction"]]
        across = abs(dy) if meta["direction"] in ("left", "right") else abs(dx)
        assert moved > 112 * 0.3 and across < 3


def test_text_is_deterministic_sentences(data: Path) -> None:
    texts = [s.text for s in iter_jsonl(data / "train" / "text.jsonl")]
    assert len(set(texts)) == len(texts) == 9
    assert all(t.endswith(".") and 3 <= t.count(". ") + 1 <= 6 for t in texts)


def test_memory_filesystem_gets_the_same_bytes(data: Path) -> None:
    generate("memory://synthetic-test/data", **SMALL)
    fs = fsspec.filesystem("memory")
    try:
        for relative, content in _tree(data).items():
            got = fs.cat_file(f"/synthetic-test/data/{relative}")
            assert got == content, relative
    finally:
        fs.rm("/synthetic-test", recursive=True)


def test_s3_destination_through_moto(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    # Dummy credentials, no config files, no instance metadata, no proxies: nothing but 127.0.0.1 is reachable.
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "AWS_ENDPOINT_URL",
    ):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "NO_PROXY": "127.0.0.1",
    }.items():
        monkeypatch.setenv(name, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"endpoint_url": f"http://{host}:{port}"}
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.mkdir("bucket")
        small = {**SMALL, "num_images": 3, "num_videos": 2, "num_texts": 2}
        generate("s3://bucket/synthetic", storage_options=options, **small)
        manifest = json.loads(fs.cat_file("bucket/synthetic/manifest.json"))
        assert manifest["files"]["val/video_qa.jsonl"] == 1
        # Item 0 is the same wherever it is written.
        local = (data / "train/images/img-000000.png").read_bytes()
        assert fs.cat_file("bucket/synthetic/train/images/img-000000.png") == local
        samples = list(iter_jsonl("s3://bucket/synthetic/train/grounding.jsonl", storage_options=options))
        assert samples[0].messages[0].content[0].image == "s3://bucket/synthetic/train/images/img-000000.png"
    finally:
        server.stop()


def test_cli_and_config_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        str(tmp_path / "cli"),
        "--seed",
        "5",
        "--num-images",
        "2",
        "--num-videos",
        "0",
        "--num-texts",
        "1",
    ]
    assert main([*argv, "--storage-option", "auto_mkdir=true"]) == 0
    assert json.loads(capsys.readouterr().out)["files"]["val/captions.jsonl"] == 1
    img = Image.open(io.BytesIO((tmp_path / "cli/train/images/img-000000.png").read_bytes()))
    assert img.size == (224, 224)
    assert main([str(tmp_path / "bad"), "--video-size", "113"]) == 1
    assert "video_size must be even" in capsys.readouterr().err
    for bad in ({"max_shapes": 7}, {"image_size": 20}, {"val_fraction": 1.0}, {"num_images": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SyntheticConfig(**bad)
