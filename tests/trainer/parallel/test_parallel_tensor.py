"""Acceptance: tensor parallelism tp=2 (2 processes, ViT and LLM sharded together, with selective activation
checkpointing on) equals the single-process run."""

from __future__ import annotations

import pytest
from parallel_equivalence import assert_matches_reference
from parallel_harness import reference, run

pytestmark = pytest.mark.multiproc


def test_tp2_equals_single_process(tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)
    # Recomputing some blocks in backward changes nothing numerically, so the reference runs without it.
    ranks = run(tmp_path, {"tp": 2}, {"engine": {"checkpoint_vision": (1,), "checkpoint_text": True}})
    assert_matches_reference(ranks, ref)
    # Each tp rank holds half of every sharded matrix, so well under the full model's trainable parameters.
    assert all(r["trainable_numel"] < ref["trainable_numel"] for r in ranks)
