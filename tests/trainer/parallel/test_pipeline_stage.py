"""A pipeline stage is the model cut to its own modules and run by its own forward: chained in one process, the
stages give the whole model's summed loss and gradients bit for bit, under the whole model's parameter names.
No processes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from parallel_harness import collate, make_row, model_config

from trainer.models.qwen2_vl import Qwen2VL
from trainer.models.qwen2_vl.rope import inverse_frequencies
from trainer.models.qwen2_vl.weights import build_on_meta
from trainer.parallel.pipeline import PipelineStage, split_layers

# Three stages over the tiny model's two layers: stage 0 holds the ViT and the embedding but no layer.
NUM_STAGES, FIRST_STAGE_LAYERS = 3, 0


def _stages(model: Qwen2VL) -> list[PipelineStage]:
    split = split_layers(model.cfg.text.num_hidden_layers, NUM_STAGES, FIRST_STAGE_LAYERS)
    return [
        PipelineStage(copy.deepcopy(model), stage=s, num_stages=NUM_STAGES, layers=layers)
        for s, layers in enumerate(split)
    ]


def _batch(cfg) -> dict:
    rng = np.random.default_rng(3)
    batch = collate([make_row(rng, cfg) for _ in range(3)])
    assert "pixel_values" in batch and "pixel_values_videos" in batch
    return batch


def test_chained_stages_equal_the_whole_model_bit_for_bit():
    cfg = model_config()
    torch.manual_seed(0)
    model = Qwen2VL(cfg)
    stages = _stages(model)
    batch = _batch(cfg)
    whole = model(
        batch["input_ids"],
        segment_ids=batch["segment_ids"],
        labels=batch["labels"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        pixel_values_videos=batch["pixel_values_videos"],
        video_grid_thw=batch["video_grid_thw"],
        return_logits=False,
        loss_reduction="sum",
    )
    whole.loss.backward()

    out = None
    for stage in stages:
        out = stage(batch, out)
    out.backward()
    assert torch.equal(out, whole.loss)
    grads = {name: p.grad for stage in stages for name, p in stage.named_parameters()}
    assert grads.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        assert torch.equal(grads[name], p.grad), name


def test_stages_partition_the_parameters_under_their_full_names():
    model = build_on_meta(model_config())
    full = list(dict(model.named_parameters()))
    names = [list(dict(stage.named_parameters())) for stage in _stages(model)]
    assert sorted(sum(names, [])) == sorted(full)
    assert any(n.startswith("visual.") for n in names[0]) and "model.embed_tokens.weight" in names[0]
    assert not any(n.startswith("model.layers.") for n in names[0])
    assert {n.split(".")[2] for n in names[1]} == {"0"} and names[1][0].startswith("model.layers.0.")
    assert "lm_head.weight" in names[2] and "model.norm.weight" in names[2]
    assert {n.split(".")[2] for n in names[2] if n.startswith("model.layers.")} == {"1"}


def test_a_meta_stage_is_initialised_by_the_model_init():
    cfg = model_config()
    stage = _stages(build_on_meta(cfg))[2]
    stage.to_empty(device=torch.device("cpu"))
    stage.init_weights()
    for name, p in stage.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert 0.015 < float(p.detach().std()) < 0.025, name
    text = cfg.text
    assert torch.equal(stage.model.inv_freq, inverse_frequencies(text.head_dim, text.rope_theta))


def test_a_later_stage_needs_the_previous_hidden_states():
    cfg = model_config()
    later = _stages(Qwen2VL(cfg))[1]
    with pytest.raises(ValueError, match="hidden"):
        later(_batch(cfg))
