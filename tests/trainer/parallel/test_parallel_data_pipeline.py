"""Acceptance: dp=2 x pp=2 (4 processes, one decoder layer per stage) equals the single-process run, with
ZeRO-1 sharding each stage's optimizer state over its two data-parallel ranks."""

from __future__ import annotations

import pytest
from parallel_equivalence import assert_matches_reference, assert_zero1_shards
from parallel_harness import reference, run

pytestmark = pytest.mark.multiproc


def test_dp2_pp2_equals_single_process_with_zero1(tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)
    ranks = run(tmp_path, {"dp": 2, "pp": 2}, {"engine": {"first_stage_layers": 1}})
    assert_matches_reference(ranks, ref)
    assert_zero1_shards(ranks, dp=2)
    assert {tuple(r["stage_layers"]) for r in ranks} == {(0,), (1,)}
