"""The packing plan, row assembly and collation, down to the tiny model giving packed samples their solo logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from packed_samples import CFG, make_sample, packing, random_samples

from trainer.data.bad_samples import COST_MISMATCH, MALFORMED, BadSample
from trainer.data.loader import LoaderConfig, PackedLoader, collate
from trainer.data.packing import (
    KNOWN_BAD,
    TOO_LONG,
    TOO_MUCH_VISION,
    CostTable,
    PackingConfig,
    Slot,
    epoch_order,
    plan_epoch,
)
from trainer.data.rows import build_batch, fit_sample, pack_row
from trainer.data.source import InMemorySource, SampleCost
from trainer.data.types import IGNORE_INDEX
from trainer.models.qwen2_vl import Qwen2VL


def source_of(samples):
    return InMemorySource(samples, image_token_id=CFG.image_token_id, video_token_id=CFG.video_token_id)


def test_sample_cost_finds_vision_blocks_and_labels():
    rng = np.random.default_rng(0)
    sample = make_sample(0, rng, prompt=3, images=[(1, 2, 4)], videos=[(2, 2, 2)], after=2, answer=5)
    cost = SampleCost.from_encoded(
        sample, image_token_id=CFG.image_token_id, video_token_id=CFG.video_token_id
    )
    # prompt 3, <vs> 2 image pads <ve>, <vs> 2 video pads <ve>, 2 text, 5 answer
    assert cost.vision_spans == ((4, 6), (8, 10))
    assert cost.label_spans == ((13, 18),)
    assert (cost.num_tokens, cost.num_vision_tokens) == (18, 4)
    assert cost.min_cut(1) == 14 and cost.min_cut(5) == 18 and cost.min_cut(6) is None
    with pytest.raises(ValueError, match="vision_spans"):
        SampleCost(num_tokens=5, vision_spans=((2, 7),))


def test_epoch_order_is_a_pinned_seeded_permutation():
    # Pinned: the order must not change with the numpy version, or resumed runs would change their data.
    assert epoch_order(10, seed=0, epoch=0).tolist() == [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]
    orders = {tuple(epoch_order(1000, seed, epoch).tolist()) for seed in (0, 1) for epoch in (0, 1)}
    assert len(orders) == 4
    assert all(sorted(order) == list(range(1000)) for order in orders)


def random_table(n: int, seed: int) -> CostTable:
    rng = np.random.default_rng(seed)
    num_tokens = rng.integers(1, 300, n)
    num_tokens[rng.random(n) < 0.03] = 0  # known bad
    vision = np.where(rng.random(n) < 0.5, rng.integers(1, 160, n), 0)
    min_cut = np.where(rng.random(n) < 0.5, rng.integers(1, 300, n), -1)
    return CostTable(num_tokens=num_tokens, num_vision_tokens=vision, min_cut=min_cut)


def test_plan_is_greedy_in_stream_order_within_row_len_and_vision_budget():
    table, row_len, budget = random_table(3000, seed=1), 256, 128
    cfg = PackingConfig(row_len=row_len, max_vision_tokens_per_row=budget)
    plan = plan_epoch(table, cfg, seed=5, epoch=2)
    rank = np.empty(len(table), dtype=np.int64)
    rank[epoch_order(len(table), 5, 2)] = np.arange(len(table))  # stream position of each sample
    seen, previous = 0, None
    for r in range(plan.num_rows):
        row = plan.row(r)
        keep = sum(s.keep for s in row.slots)
        vision = sum(s.num_vision_tokens for s in row.slots)
        assert row.slots and keep <= row_len and vision <= budget
        # The row's slots and the drops counted with it are the next stretch of the stream.
        members = sorted(rank[[s.index for s in row.slots] + [i for i, _ in row.drops]].tolist())
        assert members == list(range(seen, seen + len(members)))
        seen += len(members)
        if previous is not None:  # greedy: the row's first sample did not fit the row before
            first = row.slots[0]
            assert (previous[0] + first.keep > row_len) or (previous[1] + first.num_vision_tokens > budget)
        previous = (keep, vision)
        for s in row.slots:
            assert s.keep == min(s.num_tokens, row_len)
            if s.keep < s.num_tokens:  # truncated: alone in its row, the cut after its vision and labels
                assert len(row.slots) == 1 and 0 < table.min_cut[s.index] <= row_len
        for i, reason in row.drops:
            n, v, cut = table.num_tokens[i], table.num_vision_tokens[i], table.min_cut[i]
            assert reason == (KNOWN_BAD if n == 0 else TOO_MUCH_VISION if v > budget else TOO_LONG)
            assert reason != TOO_LONG or (n > row_len and not 0 < cut <= row_len)
    assert seen == len(table)
    # Not truncating drops every over-long sample instead.
    strict = plan_epoch(
        table,
        PackingConfig(row_len=row_len, max_vision_tokens_per_row=budget, truncate=False),
        seed=5,
        epoch=2,
    )
    assert (table.num_tokens[strict.slot_index] <= row_len).all()
    assert len(strict.drop_index) > len(plan.drop_index)


def test_truncation_keeps_vision_blocks_whole_else_drops():
    rng = np.random.default_rng(3)
    row_len = 40
    samples = [
        make_sample(
            0, rng, prompt=2, images=[(1, 4, 4)], answer=50
        ),  # 2+6+2=10 before a long answer: truncated
        make_sample(
            1, rng, prompt=36, images=[(1, 4, 4)], answer=5
        ),  # its image pads straddle the cut: too long
        make_sample(2, rng, prompt=2, images=[(1, 2, 2)], after=40, answer=5),  # no label before the cut
        make_sample(3, rng, prompt=2, videos=[(3, 2, 4)], answer=3),  # 6 video tokens, over the budget of 5
        make_sample(4, rng, prompt=3, images=[(1, 2, 2)], answer=3),  # fits
    ]
    source = source_of(samples)
    cfg = packing(row_len=row_len, max_vision_tokens_per_row=5)
    plan = plan_epoch(CostTable.from_source(source, cfg), cfg, seed=0, epoch=0, shuffle=False)
    assert [[s.index for s in plan.row(r).slots] for r in range(plan.num_rows)] == [[0], [4]]
    drops = [d for r in range(plan.num_rows) for d in plan.row(r).drops]
    assert drops == [(1, TOO_LONG), (2, TOO_LONG), (3, TOO_MUCH_VISION)]

    built = build_batch(source, [plan.row(0), plan.row(1)], cfg)
    assert built.num_truncated == 1 and {f.index for f in built.failures} == {1, 2, 3}
    ids, labels = built.arrays["input_ids"][0], built.arrays["labels"][0]
    assert (ids == samples[0].input_ids[:row_len]).all() and (labels == samples[0].labels[:row_len]).all()
    assert (ids == CFG.image_token_id).sum() == 4  # the whole image, and all its pixel rows
    assert np.array_equal(built.arrays["pixel_values"][:16], samples[0].pixel_values)
    assert (labels != IGNORE_INDEX).any()

    no_truncation = packing(row_len=row_len, max_vision_tokens_per_row=5, truncate=False)
    strict = plan_epoch(
        CostTable.from_source(source, no_truncation), no_truncation, seed=0, epoch=0, shuffle=False
    )
    assert [s.index for s in strict.row(0).slots] == [4] and (0, TOO_LONG) in strict.row(0).drops


def test_pack_row_segments_labels_and_failed_slot_as_padding():
    rng = np.random.default_rng(4)
    a = make_sample(7, rng, prompt=2, images=[(1, 2, 2)], answer=3)
    b = make_sample(9, rng, prompt=2, images=[(1, 2, 4)], videos=[(2, 2, 2)], answer=2)
    cfg = packing(row_len=len(a) + 5 + len(b) + 3)
    row = pack_row([a, 5, b], cfg)  # 5: a failed sample's slot
    n = len(a)
    assert row.segment_ids.tolist() == [0] * n + [-1] * 5 + [1] * len(b) + [-1] * 3
    assert (row.input_ids[:n] == a.input_ids).all() and (
        row.input_ids[n + 5 : n + 5 + len(b)] == b.input_ids
    ).all()
    assert (row.input_ids[row.segment_ids < 0] == CFG.pad_token_id).all()
    assert (row.labels[row.segment_ids < 0] == IGNORE_INDEX).all()
    assert (row.labels[:n] == a.labels).all()
    assert np.array_equal(row.pixel_values, np.concatenate([a.pixel_values, b.pixel_values]))
    assert row.image_grid_thw.tolist() == [[1, 2, 2], [1, 2, 4]] and row.video_grid_thw.tolist() == [
        [2, 2, 2]
    ]
    assert row.sample_indices == [7, 9]
    with pytest.raises(ValueError, match="row_len"):
        pack_row([a, b, 100], cfg)


def test_collate_has_fixed_row_shapes_and_row_major_vision():
    rng = np.random.default_rng(5)
    cfg = packing(row_len=32)
    text = make_sample(0, rng, prompt=4, answer=4)
    image = make_sample(1, rng, prompt=2, images=[(1, 4, 2)], answer=2)
    video = make_sample(2, rng, prompt=2, videos=[(3, 2, 4)], answer=2)
    rows = [pack_row([text], cfg), pack_row([image, video], cfg), pack_row([image], cfg)]
    batch = collate(rows)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (3, 32), "labels": (3, 32), "segment_ids": (3, 32),
        "pixel_values": (16, CFG.vision.patch_dim), "image_grid_thw": (2, 3),
        "pixel_values_videos": (24, CFG.vision.patch_dim), "video_grid_thw": (1, 3),
    }  # fmt: skip
    assert batch["input_ids"].dtype == torch.int64 and batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"][:8], torch.from_numpy(image.pixel_values))
    assert set(collate([rows[0]])) == {"input_ids", "labels", "segment_ids"}
    with pytest.raises(ValueError, match="one length"):
        collate([rows[0], pack_row([text], packing(row_len=20))])


def test_fit_sample_rejects_samples_that_disagree_with_their_cost():
    rng = np.random.default_rng(6)
    sample = make_sample(3, rng, prompt=2, images=[(1, 2, 2)], answer=3)
    cfg = packing(row_len=64)
    with pytest.raises(BadSample, match="its cost says") as stale:
        fit_sample(sample, Slot(3, len(sample) + 1, 1, len(sample) + 1), cfg)
    assert stale.value.reason == COST_MISMATCH
    broken = make_sample(3, rng, prompt=2, images=[(1, 2, 2)], answer=3)
    broken.input_ids[broken.input_ids == CFG.image_token_id] = 5  # pads gone, grid still there
    with pytest.raises(BadSample, match="0 image pad tokens") as bad:
        fit_sample(broken, Slot(3, len(broken), 1, len(broken)), cfg)
    assert bad.value.reason == MALFORMED


@pytest.mark.parametrize(("changes", "field"), [
    ({"row_len": 0}, "row_len"),
    ({"max_vision_tokens_per_row": 0}, "max_vision_tokens_per_row"),
    ({"min_supervised_tokens": 0}, "min_supervised_tokens"),
    ({"video_token_id": 5, "image_token_id": 5}, "video_token_id"),
    ({"pad_token_id": -1}, "pad_token_id"),
])  # fmt: skip
def test_packing_config_names_the_bad_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        PackingConfig(**changes)


def test_packed_batch_gives_every_sample_its_solo_logits():
    """End to end: loader rows through the tiny model equal each sample run alone, a truncated one included."""
    samples = random_samples(14, seed=8)
    rng = np.random.default_rng(9)
    samples.append(make_sample(14, rng, prompt=3, images=[(1, 4, 4)], videos=[(3, 2, 4)], answer=80))
    cfg = packing(row_len=80, max_vision_tokens_per_row=24)
    loader = PackedLoader(
        source_of(samples), packing=cfg, config=LoaderConfig(rows_per_step=3, shuffle=False)
    )
    torch.manual_seed(0)
    model = Qwen2VL(CFG).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the init's, so a wrong mask or position shows
            p.add_(torch.randn_like(p) * 0.05)
    checked, truncated, crossed = 0, False, False
    for mb in loader:
        if all(row.epoch > 0 for row in mb.rows):
            break
        with torch.no_grad():
            out = model(**mb.inputs)
            segments = mb.inputs["segment_ids"]
            for b, indices in enumerate(mb.sample_indices):
                for seg, index in enumerate(indices):
                    s, where = samples[index], (segments[b] == seg).nonzero().squeeze(1)
                    truncated |= len(where) < len(s)
                    vision = {k: torch.from_numpy(v) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                              "video_grid_thw") if (v := getattr(s, k)) is not None}  # fmt: skip
                    alone = model(torch.from_numpy(s.input_ids)[None], **vision).logits[0, : len(where)]
                    assert (out.logits[b, where] - alone).abs().max() < 1e-5
                    checked += 1
            assert torch.isfinite(out.loss) and out.num_loss_tokens > 0
            if not crossed and any(len(indices) > 1 for indices in mb.sample_indices):
                # The check has teeth: read as one sample per row, later samples get other logits.
                crossed = True
                merged = {**mb.inputs, "segment_ids": torch.where(segments >= 0, 0, -1)}
                later = (segments > 0) & (merged["segment_ids"] == 0)
                assert (model(**merged).logits[later] - out.logits[later]).abs().max() > 1e-3
    assert checked == len(samples) and truncated and crossed
