"""The training stages' trainable selections on real runs: frozen parameters never change and hold no optimizer
state, and stage 1 (LLM frozen) at pp=2, where the last pipeline stage trains nothing, equals the single-process
run."""

from __future__ import annotations

import pytest
from parallel_harness import reference, run

from trainer.parallel import is_trainable

pytestmark = pytest.mark.multiproc


def test_stage1_pipeline_trains_only_the_vision_side(tmp_path, tmp_path_factory):
    options = {"engine": {"training_stage": 1}}
    ref = reference(tmp_path_factory, options)
    ranks = sorted(run(tmp_path, {"pp": 2}, options), key=lambda r: r["coords"][1])
    assert [r["losses"] for r in ranks] == [ranks[0]["losses"]] * 2
    assert ranks[0]["losses"] == pytest.approx(ref["losses"], abs=1e-5, rel=0)
    assert ranks[0]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    first, last = ranks
    assert first["trainable"] and all(n.startswith("visual.") for n in first["trainable"])
    assert set(first["changed"]) <= set(first["trainable"])
    assert last["trainable"] == [] and last["changed"] == [] and last["optimizer_numel"] == 0
    assert ref["optimizer_numel"] == ref["trainable_numel"] == first["trainable_numel"]


def test_stage3_freezes_the_vision_encoder(tmp_path):
    (r,) = run(tmp_path, {}, {"engine": {"training_stage": 3}, "steps": 3})
    assert r["trainable"] == sorted(n for n in r["trainable"] if is_trainable(n, 3))
    assert any(n.startswith("visual.merger.") for n in r["changed"])
    assert any(n.startswith("model.layers.") for n in r["changed"])
    assert not any(n.startswith(("visual.blocks.", "visual.patch_embed.")) for n in r["changed"])
    assert not any(n.startswith(("visual.blocks.", "visual.patch_embed.")) for n in r["trainable"])
    assert r["optimizer_numel"] == r["trainable_numel"]
