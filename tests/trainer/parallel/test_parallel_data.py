"""Acceptance: data parallelism dp=2 (2 processes) equals the single-process run; ZeRO-1 shards the optimizer."""

from __future__ import annotations

import pytest
from parallel_equivalence import assert_matches_reference, assert_zero1_shards
from parallel_harness import reference, run

pytestmark = pytest.mark.multiproc


def test_dp2_equals_single_process_with_zero1(tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)
    ranks = run(tmp_path, {"dp": 2})
    assert_matches_reference(ranks, ref)
    assert_zero1_shards(ranks, dp=2)
    assert ref["optimizer_numel"] == ref["trainable_numel"]
