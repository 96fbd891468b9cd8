"""tp=2 x pp=2 (4 processes): the tensor-parallel stages of a pipeline equal the single-process run, and the
gradient norm DeepSpeed clips by spans both stages and counts tp-replicated weights once. The model is built on
the meta device and its full weights loaded into the engine afterwards (sharded there), as pretrained weights
are."""

from __future__ import annotations

import pytest
from parallel_equivalence import assert_matches_reference
from parallel_harness import reference, run

pytestmark = pytest.mark.multiproc


def test_tp2_pp2_equals_single_process(tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)
    ranks = run(tmp_path, {"tp": 2, "pp": 2}, {"engine": {"first_stage_layers": 1}, "meta": True})
    assert_matches_reference(ranks, ref)
