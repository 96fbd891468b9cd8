"""Model behaviour that needs no reference implementation: packing, presets, checkpointing, errors."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import IMAGE_GRIDS, VIDEO_GRIDS, random_model, sample_rows, tiny

from trainer.models.qwen2_vl import Qwen2VL, preset
from trainer.models.qwen2_vl.info import count_parameters
from trainer.models.qwen2_vl.weights import build_on_meta


def _pixels(cfg, grids, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t * h * w, cfg.vision.patch_dim, generator=g) for t, h, w in grids]


def test_packed_row_equals_each_sample_alone():
    """Three samples (images, a video, plain text) packed in one padded row give their solo logits."""
    cfg = tiny()
    model = random_model(cfg, seed=7)
    row_a, row_b = sample_rows(cfg, seed=2)
    row_c = torch.randint(0, 400, (9,)).tolist()
    images, videos = _pixels(cfg, IMAGE_GRIDS, 1), _pixels(cfg, VIDEO_GRIDS, 2)
    # Vision inputs per sample, in order of appearance: A has images 0 and 1; B has the video, then image 2.
    solo_inputs = [
        (row_a, dict(pixel_values=torch.cat(images[:2]), image_grid_thw=torch.tensor(IMAGE_GRIDS[:2]))),
        (
            row_b,
            dict(
                pixel_values=images[2],
                image_grid_thw=torch.tensor(IMAGE_GRIDS[2:]),
                pixel_values_videos=videos[0],
                video_grid_thw=torch.tensor(VIDEO_GRIDS),
            ),
        ),
        (row_c, {}),
    ]
    pad = 5
    packed = torch.tensor(row_a + row_b + row_c + [cfg.pad_token_id] * pad)[None]
    segments = torch.tensor([0] * len(row_a) + [1] * len(row_b) + [2] * len(row_c) + [-1] * pad)[None]
    with torch.no_grad():
        out = model(
            packed,
            segment_ids=segments,
            pixel_values=torch.cat(images),
            image_grid_thw=torch.tensor(IMAGE_GRIDS),
            pixel_values_videos=videos[0],
            video_grid_thw=torch.tensor(VIDEO_GRIDS),
        ).logits[0]
        start = 0
        for ids, vision in solo_inputs:
            alone = model(torch.tensor(ids)[None], **vision).logits[0]
            assert (out[start : start + len(ids)] - alone).abs().max() < 1e-5
            start += len(ids)


def test_packed_loss_never_crosses_samples():
    cfg = tiny()
    model = random_model(cfg)
    ids = torch.randint(0, 400, (1, 12))
    segments = torch.tensor([[0] * 6 + [1] * 6])
    labels = ids.clone()
    out = model(ids, segment_ids=segments, labels=labels)
    assert out.num_loss_tokens == 10  # 11 shifted targets minus the one at the boundary


@pytest.mark.parametrize(
    ("name", "expected"), [("2b", 2_208_985_600), ("7b", 8_291_375_616), ("72b", 73_405_560_320)]
)
def test_released_parameter_counts_on_meta(name, expected):
    model = build_on_meta(preset(name))
    assert all(p.is_meta for p in model.parameters())
    counts = count_parameters(model)
    assert counts.total == expected
    assert counts.vision == {"2b": 665_271_296, "7b": 675_759_104, "72b": 699_356_672}[name]


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*2b, 7b, 72b"):
        preset("huge")


def test_activation_checkpointing_keeps_gradients():
    cfg = tiny()
    rows = sample_rows(cfg)
    ids = torch.tensor(rows[0])[None]
    kwargs = dict(
        pixel_values=torch.cat(_pixels(cfg, IMAGE_GRIDS[:2], 0)),
        image_grid_thw=torch.tensor(IMAGE_GRIDS[:2]),
        labels=ids,
    )
    grads = []
    for on in (False, True):
        model = random_model(cfg, seed=4).train()
        model.set_activation_checkpointing(vision=on, text={1} if on else False)
        model(ids, **kwargs).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_config_validation_names_the_field():
    cfg = tiny()
    with pytest.raises(ValueError, match="text.mrope_section"):
        type(cfg.text)(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 2, 2))
    with pytest.raises(ValueError, match="vision.hidden_size"):
        cfg.replace(vision=type(cfg.vision)(hidden_size=32))


def test_grid_patch_count_mismatch_is_an_error():
    cfg = tiny()
    model = Qwen2VL(cfg)
    with pytest.raises(ValueError, match="pixel_values has 10 patches"):
        model.visual(torch.randn(10, cfg.vision.patch_dim), torch.tensor([[1, 4, 4]]))


def test_varlen_boundaries_cover_samples_and_padding_runs():
    from trainer.models.qwen2_vl.attention import varlen_segments

    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    varlen = varlen_segments(segments)
    assert varlen.cu_seqlens.tolist() == [0, 3, 5, 6, 12]
    assert varlen.cu_seqlens.dtype == torch.int32 and varlen.max_len == 6


def test_loss_only_path_matches_full_logits():
    """Training projects only supervised positions; loss and gradients equal the full-logits path."""
    cfg = tiny()
    ids = torch.randint(0, 400, (2, 30), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100
    segments = torch.tensor([[0] * 15 + [1] * 15, [0] * 25 + [-1] * 5])
    results = []
    for full in (True, False):
        model = random_model(cfg, seed=9)
        out = model(ids, segment_ids=segments, labels=labels, return_logits=full)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]  # the ViT sees no image here
        results.append((out.loss.detach(), out.num_loss_tokens, grads))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b and torch.allclose(loss_a, loss_b, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_summed_loss_is_the_mean_times_the_supervised_tokens():
    cfg = tiny()
    model = random_model(cfg, seed=3)
    ids = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(1))
    labels = torch.where(torch.arange(20) < 8, -100, ids)
    for full in (True, False):
        mean = model(ids, labels=labels, return_logits=full)
        total = model(ids, labels=labels, return_logits=full, loss_reduction="sum")
        assert total.num_loss_tokens == mean.num_loss_tokens == 2 * 12
        assert torch.allclose(total.loss, mean.loss * mean.num_loss_tokens, rtol=1e-6)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(ids, labels=labels, loss_reduction="max")


def test_contract_lists_every_preset():
    from trainer.contract import MODEL_PRESETS
    from trainer.models.qwen2_vl.config import PRESETS

    assert tuple(PRESETS) == MODEL_PRESETS
