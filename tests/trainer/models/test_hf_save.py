"""`save_pretrained` output loads in both transformers lines: the pinned 4.57 (in the venv) and 5.x.

transformers 5 lives in its own folder, `.cache/transformers5` (the Makefile's venv recipe installs it with
`pip --target`, leaving the venv's pinned 4.57 alone), and runs in a subprocess with that folder first on
PYTHONPATH. VLCTL_TRANSFORMERS5 points the test at another folder. A missing folder fails the test rather than
skipping it: a skip would hide exactly the regression this file guards.

The model under test has a 2,048-token vocabulary and no pad id. Our config's default pad id (the real
tokenizer's `<|endoftext|>`, 151643) is outside such a vocabulary, and transformers uses a saved `pad_token_id`
as the embedding's `padding_idx` and refuses one past the table (issue 11): the config refuses that pad id, a
save writes none, and a load without one gives a small vocabulary none.

The batch holds images and a video whose temporal patches do not outnumber its merged rows and columns
(t = h' = w' = 2): transformers 5 advances text positions after a video by max(h', w') instead of the
released max(t, h', w') (see test_parity.py), and the two rules agree only there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_fixtures import IMAGE_GRIDS, random_model, text, vision_block

from trainer.models.qwen2_vl import Qwen2VL, Qwen2VLConfig, save_pretrained
from trainer.models.qwen2_vl.config import ENDOFTEXT_ID, tiny_config
from trainer.models.qwen2_vl.weights import load_config

TOL = 1e-5
REPO = Path(__file__).resolve().parents[3]
TRANSFORMERS5 = Path(os.environ.get("VLCTL_TRANSFORMERS5", REPO / ".cache" / "transformers5"))
HELPER = Path(__file__).with_name("transformers5_logits.py")
VIDEO_GRID = (2, 4, 4)  # t = h' = w': both transformers position rules agree


def no_pad_config(vocab_size: int = 2048) -> Qwen2VLConfig:
    """The tiny layout with a small vocabulary and no pad token."""
    return tiny_config(vocab_size=vocab_size).replace(pad_token_id=None)


def batch_inputs(cfg: Qwen2VLConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two right-padded rows: text with two images; text with a video, then an image.

    Padding uses token 0 under a zero attention mask: the model has no pad token to fill with.
    """
    g = torch.Generator().manual_seed(seed)
    img, vid = cfg.image_token_id, cfg.video_token_id
    rows = [
        text(g, 5)
        + vision_block(cfg, img, IMAGE_GRIDS[0])
        + text(g, 4)
        + vision_block(cfg, img, IMAGE_GRIDS[1]),
        text(g, 3) + vision_block(cfg, vid, VIDEO_GRID) + text(g, 7) + vision_block(cfg, img, IMAGE_GRIDS[2]),
    ]
    length = max(map(len, rows))
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    n_img = sum(t * h * w for t, h, w in IMAGE_GRIDS)
    t, h, w = VIDEO_GRID
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(n_img, cfg.vision.patch_dim, generator=g),
        "image_grid_thw": torch.tensor(IMAGE_GRIDS),
        "pixel_values_videos": torch.randn(t * h * w, cfg.vision.patch_dim, generator=g),
        "video_grid_thw": torch.tensor([VIDEO_GRID]),
    }


def our_logits(model: Qwen2VL, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.no_grad():
        return model(inputs["input_ids"], **kwargs).logits


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Largest difference over real (unmasked) positions."""
    return (a[mask.bool()] - b[mask.bool()]).abs().max().item()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Qwen2VL]:
    cfg = no_pad_config()
    model = random_model(cfg, seed=11)
    path = tmp_path_factory.mktemp("no-pad")
    save_pretrained(model, path)
    return path, model


def test_a_pad_id_outside_the_vocabulary_is_refused_by_name():
    small = tiny_config(vocab_size=2048)
    with pytest.raises(ValueError, match="pad_token_id: must be a token id below text.vocab_size"):
        small.replace(pad_token_id=ENDOFTEXT_ID)  # the default: the real tokenizer's <|endoftext|>


def test_pad_id_written_only_when_the_model_has_one(saved, tmp_path):
    path, ours = saved
    assert "pad_token_id" not in json.loads((path / "config.json").read_text())
    back = load_config(path)
    assert back.pad_token_id is None and back == ours.cfg
    assert ours.cfg.fill_token_id == ours.cfg.eos_token_id
    cfg = tiny_config(vocab_size=2048)  # a pad id of its own, inside the vocabulary: kept
    save_pretrained(Qwen2VL(cfg), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["pad_token_id"] == cfg.pad_token_id == 2043


def test_transformers_4_loads_save_without_pad_id(saved):
    import transformers

    path, ours = saved
    theirs = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        path, attn_implementation="sdpa"
    ).eval()
    assert theirs.get_input_embeddings().padding_idx is None
    inputs = batch_inputs(ours.cfg)
    with torch.no_grad():
        ref = theirs(**inputs).logits
    assert max_diff(our_logits(ours, inputs), ref, inputs["attention_mask"]) < TOL


def test_transformers_5_loads_save_without_pad_id(saved, tmp_path):
    if not (TRANSFORMERS5 / "transformers").is_dir():
        pytest.fail(
            f"transformers 5 is not installed at {TRANSFORMERS5}: run `make venv` (its recipe installs it there "
            "with pip --target; `rm .venv/.installed` first if the venv is otherwise up to date), or set VLCTL_TRANSFORMERS5 to a folder that holds it"
        )
    path, ours = saved
    inputs = batch_inputs(ours.cfg)
    torch.save(inputs, tmp_path / "batch.pt")
    env = {
        **os.environ,
        "PYTHONPATH": str(TRANSFORMERS5),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    done = subprocess.run(
        [sys.executable, str(HELPER), str(path), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"transformers 5 could not load the save:\n{done.stderr[-4000:]}"
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["version"].startswith("5.")
    assert out["pad_token_id"] is None and out["padding_idx"] is None
    assert max_diff(our_logits(ours, inputs), out["logits"], inputs["attention_mask"]) < TOL
