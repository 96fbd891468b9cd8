"""The vision bag-of-answer-tokens loss (trainer/parallel/vision_bag.py): what it computes on packed rows, and that
with it on a dp=2 run still equals the single-process run (the term is a mean over the global batch's media)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parallel_harness import collate, make_row, model_config, reference, run

from trainer.models.qwen2_vl import Qwen2VL
from trainer.models.qwen2_vl.model import IGNORE_INDEX
from trainer.parallel.vision_bag import class_vectors, count_media, vision_bag_loss

BAG = {"engine": {"vision_bag_weight": 0.5, "vision_bag_steps": 6}}


def _by_hand(model: Qwen2VL, rows: list[dict]) -> tuple[float, int]:
    """Each image or video alone: its features pooled, scored by the fixed class vectors of the batch's answer
    tokens, against its sample's answer."""
    answers = torch.cat([r["labels"][r["labels"] != IGNORE_INDEX] for r in rows]).unique()
    total, media = 0.0, 0
    for row in rows:
        ids, labels, segs = row["input_ids"], row["labels"], row["segment_ids"]
        cursor = {"image": 0, "video": 0}
        for seg in range(int(segs.max()) + 1):
            where = (segs == seg).nonzero().flatten()
            sample_ids, sample_labels = ids[where], labels[where]
            for kind, token in (("image", model.cfg.image_token_id), ("video", model.cfg.video_token_id)):
                if not (sample_ids == token).any():
                    continue
                grid = row[f"{kind}_grid_thw"][cursor[kind] : cursor[kind] + 1]
                cursor[kind] += 1
                pixels_key = "pixel_values" if kind == "image" else "pixel_values_videos"
                start = int(sum(g.prod() for g in row[f"{kind}_grid_thw"][: cursor[kind] - 1]))
                pixels = row[pixels_key][start : start + int(grid.prod())]
                pooled = model.visual(pixels, grid).mean(0)
                logp = F.log_softmax(pooled @ class_vectors(answers, pooled.shape[-1]).T, -1)
                answer = sample_labels[1:][sample_labels[1:] != IGNORE_INDEX]
                total -= float(logp[torch.searchsorted(answers, answer)].mean())
                media += 1
    return total, media


def test_bag_loss_pools_each_image_and_video_against_its_own_answer():
    cfg = model_config()
    torch.manual_seed(0)
    model = Qwen2VL(cfg)
    rng = np.random.default_rng(3)
    rows = [make_row(rng, cfg) for _ in range(3)]
    batch = collate(rows)
    vision: list = []
    with torch.no_grad():
        model.embed(
            batch["input_ids"],
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw"),
            pixel_values_videos=batch.get("pixel_values_videos"),
            video_grid_thw=batch.get("video_grid_thw"),
            vision_out=vision,
        )
        got = vision_bag_loss(vision, batch, merge=cfg.vision.spatial_merge_size)
        want, media = _by_hand(model, rows)
    assert media == count_media(batch) >= 3, "the rows hold several images and videos"
    assert float(got) == pytest.approx(want, rel=1e-5)
    # Near uniform over the batch's answer tokens at init: each item's cross-entropy is about ln(their number).
    answers = int(torch.unique(batch["labels"][batch["labels"] != IGNORE_INDEX]).numel())
    assert float(got) / media == pytest.approx(math.log(answers), rel=0.05)


def test_class_vectors_are_fixed_per_token_and_about_unit_norm():
    a = class_vectors(torch.tensor([5, 9, 151643]), 64)
    b = class_vectors(torch.tensor([9]), 64)
    assert torch.equal(a[1], b[0]), "a token's vector depends only on the token"
    assert not torch.equal(a[0], a[1])
    assert a.norm(dim=-1).tolist() == pytest.approx([1.0] * 3, abs=0.3)


@pytest.mark.multiproc
def test_dp2_with_the_bag_loss_equals_single_process(tmp_path, tmp_path_factory):
    plain = reference(tmp_path_factory)
    ref = reference(tmp_path_factory, BAG)
    ranks = run(tmp_path, {"dp": 2}, BAG)
    for r in ranks:
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5, rel=0)
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
        assert r["vision_bag_losses"][:6] == pytest.approx(ref["vision_bag_losses"][:6], abs=1e-5, rel=0)
    # On for the first 6 updates only, and it changes the training: the first loss is the same (computed
    # before any update), later ones differ from the run without it.
    assert all(math.isfinite(x) for x in ref["vision_bag_losses"][:6])
    assert all(math.isnan(x) for x in ref["vision_bag_losses"][6:])
    assert ref["losses"][0] == plain["losses"][0] and ref["losses"][3] != plain["losses"][3]
