"""Assertions shared by the acceptance tests: a parallel run equals the single-process run on the same global
batches (losses and gradient norms within 1e-5 at every step), and ZeRO-1 holds 1/dp of the optimizer state."""

from __future__ import annotations

import pytest

TOLERANCE = 1e-5


def assert_matches_reference(ranks: list[dict], ref: dict) -> None:
    assert len(ref["losses"]) == 10
    for r in ranks:
        assert r["losses"] == ranks[0]["losses"], "every rank reports the same loss"
        assert r["num_tokens"] == ref["num_tokens"]
        assert r["losses"] == pytest.approx(ref["losses"], abs=TOLERANCE, rel=0)
        assert r["grad_norms"] == pytest.approx(ref["grad_norms"], rel=TOLERANCE)
        assert r["replicated_in_sync"]
    assert max(ref["grad_norms"]) > 1.0, "clipping (max norm 1) is exercised"


def assert_zero1_shards(ranks: list[dict], dp: int) -> None:
    """Within each (pp, tp) group the dp ranks split the stage's optimizer state: each holds 1/dp of it (up to
    DeepSpeed's alignment padding), and their fragments tile every parameter exactly once."""
    groups: dict[tuple, list[dict]] = {}
    for r in ranks:
        dp_rank, pp, tp = r["coords"]
        groups.setdefault((pp, tp), []).append(r)
    for members in groups.values():
        assert len(members) == dp
        trainable = members[0]["trainable_numel"]
        assert trainable > 0
        for r in members:
            assert r["trainable_numel"] == trainable
            assert trainable / dp <= r["optimizer_numel"] <= trainable / dp + 64
        covered: dict[str, list[tuple[int, int]]] = {}
        for r in members:
            for name, frag in r["fragments"].items():
                covered.setdefault(name, []).append((frag.start, frag.start + frag.numel))
                total = frag.total
        assert sum(sum(b - a for a, b in spans) for spans in covered.values()) == trainable
        for name, spans in covered.items():
            spans.sort()
            total = members[0]["fragments"].get(name, members[-1]["fragments"].get(name)).total
            assert spans[0][0] == 0 and spans[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)), name
