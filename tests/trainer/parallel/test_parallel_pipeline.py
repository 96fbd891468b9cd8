"""Acceptance: pipeline parallelism pp=2 (2 processes, 1F1B, stage 0 = ViT + merger + embedding + k layers with k
from the cost model) equals the single-process run."""

from __future__ import annotations

import pytest
from parallel_equivalence import assert_matches_reference
from parallel_harness import reference, run

pytestmark = pytest.mark.multiproc


def test_pp2_equals_single_process(tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)
    ranks = run(tmp_path, {"pp": 2})
    assert_matches_reference(ranks, ref)
    layers = [r["stage_layers"] for r in sorted(ranks, key=lambda r: r["coords"][1])]
    assert sum(layers, []) == [0, 1]
    assert sum(r["trainable_numel"] for r in ranks) == ref["trainable_numel"]
