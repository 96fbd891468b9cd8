"""Pure pieces of the parallel runtime: mesh layout, configs, learning-rate schedule, training-stage selection,
pipeline split and 1F1B order, tensor-parallel shard layouts. No processes."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.models.qwen2_vl.config import preset, tiny_config
from trainer.parallel import EngineConfig, OptimizerConfig, ParallelDims, is_trainable, micro_batches_per_step
from trainer.parallel.pipeline import balanced_first_stage_layers, one_f_one_b_order, split_layers
from trainer.parallel.tensor import ParamLayout, check_tp_size, split_rule


def test_dims_validate_and_lay_out_ranks_tp_fastest():
    with pytest.raises(ValueError, match="tp"):
        ParallelDims(tp=0)
    with pytest.raises(ValueError, match="dp"):
        ParallelDims(dp=1.5)
    dims = ParallelDims(dp=2, tp=2, pp=3)
    assert dims.world_size == 12
    seen = set()
    for rank in range(dims.world_size):
        c = dims.coords(rank)
        assert dims.rank_of(dp=c.dp, pp=c.pp, tp=c.tp) == rank
        seen.add(tuple(c))
    assert len(seen) == 12
    assert dims.coords(1).tp == 1 and dims.coords(2).dp == 1 and dims.coords(4).pp == 1
    assert dims.group_ranks("tp")[0] == [0, 1]
    assert dims.group_ranks("dp")[0] == [0, 2]
    assert dims.group_ranks("pp")[0] == [0, 4, 8]
    assert sorted(len(g) for g in dims.group_ranks("mp")) == [6, 6]
    with pytest.raises(ValueError, match="rank"):
        dims.coords(12)


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="optimizer.lr"):
        OptimizerConfig(lr=0)
    with pytest.raises(ValueError, match="optimizer.total_steps"):
        OptimizerConfig(warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="optimizer.betas"):
        OptimizerConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="training_stage"):
        EngineConfig(training_stage=4)
    with pytest.raises(ValueError, match="precision"):
        EngineConfig(precision="fp16")
    with pytest.raises(ValueError, match="checkpoint_text"):
        EngineConfig(checkpoint_text=(-1,))
    assert EngineConfig(checkpoint_vision=[1, 2]).checkpoint_vision == (1, 2)


def test_accumulation_keeps_the_global_batch():
    assert micro_batches_per_step(rows_per_step=16, dp=1, micro_batch_rows=2) == 8
    assert micro_batches_per_step(rows_per_step=16, dp=4, micro_batch_rows=2) == 2
    with pytest.raises(ValueError, match="rows_per_step"):
        micro_batches_per_step(rows_per_step=16, dp=3, micro_batch_rows=2)


def test_learning_rate_warms_up_then_follows_the_cosine():
    opt = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=4, total_steps=14)
    assert [opt.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert opt.lr_at(4) == 1.0
    assert opt.lr_at(9) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert opt.lr_at(14) == pytest.approx(0.1) and opt.lr_at(100) == pytest.approx(0.1)
    assert OptimizerConfig(lr=0.5).lr_at(1000) == 0.5


def test_training_stages_select_parameters():
    names = [
        "visual.patch_embed.proj.weight",
        "visual.blocks.0.attn.qkv.weight",
        "visual.merger.mlp.0.weight",
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "lm_head.weight",
    ]
    assert [is_trainable(n, 1) for n in names] == [True, True, True, False, False, False]
    assert all(is_trainable(n, 2) for n in names)
    assert [is_trainable(n, 3) for n in names] == [False, False, True, True, True, True]


def test_layer_split_gives_stage_zero_k_layers_and_spreads_the_rest():
    assert split_layers(28, 1, 28) == [range(28)]
    assert split_layers(28, 4, 4) == [range(0, 4), range(4, 12), range(12, 20), range(20, 28)]
    # 7 layers over 3 stages: the extra one goes to a middle stage, not to the last (it carries the head).
    assert [len(r) for r in split_layers(8, 4, 1)] == [1, 3, 2, 2]
    assert [len(r) for r in split_layers(2, 2, 0)] == [0, 2]
    with pytest.raises(ValueError, match="first_stage_layers"):
        split_layers(4, 2, 5)


def test_default_first_stage_layers_balance_the_vision_encoder():
    cfg = preset("2b")
    k2, k4 = balanced_first_stage_layers(cfg, 2), balanced_first_stage_layers(cfg, 4)
    # The 2B ViT costs many decoder layers at half vision tokens: stage 0 gets fewer layers than an even split.
    assert 0 <= k4 < k2 < 28 // 2
    assert balanced_first_stage_layers(cfg, 2, vision_token_fraction=0.0) > k2
    assert balanced_first_stage_layers(cfg, 1) == 28
    assert balanced_first_stage_layers(tiny_config(), 2) in (0, 1, 2)


@pytest.mark.parametrize("stages,micro", [(1, 3), (2, 4), (4, 4), (4, 2), (3, 7)])
def test_one_f_one_b_order(stages, micro):
    for stage in range(stages):
        order = one_f_one_b_order(stage, stages, micro)
        assert sorted(order) == sorted([("F", i) for i in range(micro)] + [("B", i) for i in range(micro)])
        in_flight, peak = 0, 0
        for kind, i in order:
            assert kind == "F" or ("F", i) in order[: order.index((kind, i))]
            in_flight += 1 if kind == "F" else -1
            peak = max(peak, in_flight)
        # 1F1B keeps at most (stages - stage) micro-batches' activations alive.
        assert peak <= min(stages - stage, micro)


def test_param_layout_shards_fused_qkv_by_heads_within_each_third():
    heads, dim, tp = 4, 2, 2
    full = torch.arange(3 * heads * dim * 3, dtype=torch.float32).view(3 * heads * dim, 3)
    layouts = [ParamLayout(tuple(full.shape), 0, 3, r, tp) for r in range(tp)]
    shards = [lay.shard(full) for lay in layouts]
    assert shards[0].shape == (3 * heads * dim // tp, 3)
    q, k, v = full.chunk(3)
    # rank 0 holds the first half of the heads of q, of k and of v
    assert torch.equal(
        shards[0], torch.cat([q[: heads * dim // 2], k[: heads * dim // 2], v[: heads * dim // 2]])
    )
    assert torch.equal(layouts[0].unshard(shards), full)
    view, global_view, offsets = layouts[1].blocked(shards[1])
    assert global_view == (3, heads * dim, 3) and offsets == (0, heads * dim // 2, 0)
    assert torch.equal(full.view(global_view)[:, offsets[1] : offsets[1] + view.shape[1]], view)
    # The blocked shape does not depend on tp, so a checkpoint reshards between tp sizes.
    whole = ParamLayout(tuple(full.shape), 0, 3, 0, 1)
    assert whole.blocked(full)[1:] == ((3, heads * dim, 3), (0, 0, 0))
    # Single-block splits keep the parameter's shape; the piece sits at its row offset.
    rows = ParamLayout((8, 3), 0, 1, 1, 2)
    assert rows.blocked(torch.zeros(4, 3))[1:] == ((8, 3), (4, 0))
    cols = ParamLayout((3, 8), 1, 1, 1, 2)
    assert cols.blocked(torch.zeros(3, 4))[1:] == ((3, 8), (0, 4))


def test_split_rules_and_tp_size_checks():
    assert split_rule("visual.blocks.3.attn.qkv.bias") == (0, 3)
    assert split_rule("visual.blocks.3.mlp.fc2.weight") == (1, 1)
    assert split_rule("visual.blocks.3.mlp.fc2.bias") is None  # added once after the all-reduce: replicated
    assert split_rule("model.layers.0.self_attn.k_proj.bias") == (0, 1)
    assert split_rule("model.layers.0.mlp.down_proj.weight") == (1, 1)
    assert split_rule("visual.merger.mlp.0.weight") is None
    assert split_rule("lm_head.weight") is None
    check_tp_size(tiny_config(), 2)
    with pytest.raises(ValueError, match="vision.num_heads"):
        check_tp_size(tiny_config(), 4)
    with pytest.raises(ValueError, match="text.num_key_value_heads"):
        check_tp_size(preset("2b"), 4)  # 16 ViT heads, 2 key-value heads
