"""A TrainingJob's status is written from the job's view and read back as the same view (what
`vlctl --backend kubernetes status` shows is what the store says)."""

from __future__ import annotations

from datetime import UTC, datetime

from controller.domain.phases import Phase
from controller.views import CheckpointView, JobView, RankView
from k8s.status import job_status, view_from_object

COMMITTED = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def test_a_status_written_from_a_view_reads_back_as_that_view() -> None:
    view = JobView(
        name="vl-sft",
        phase=Phase.RUNNING,
        reason="RanksStarted",
        message="4 ranks on 2 nodes",
        attempt=2,
        restarts=1,
        restarts_counted=1,
        step=40,
        total_steps=100,
        loss=2.5,
        tokens_per_second=1234.0,
        last_checkpoint=CheckpointView(step=32, uri="s3://ckpt/step-32", committed_at=COMMITTED),
        ettr=0.91,
        excluded_nodes=("node-c",),
        stragglers=(RankView(rank=3, node="node-b", straggler_score=9.5, flagged=True),),
    )
    status = job_status(view, generation=1, previous=None, now="2026-12-06T12:05:00Z")
    obj = {
        "metadata": {"name": "vl-sft", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": {"resources": {"nodes": 2, "procs_per_node": 2}},
        "status": status,
    }
    back = view_from_object(obj)
    same = (
        "name",
        "phase",
        "reason",
        "message",
        "attempt",
        "restarts",
        "restarts_counted",
        "step",
        "total_steps",
    )
    assert {k: getattr(back, k) for k in same} == {k: getattr(view, k) for k in same}
    assert (back.loss, back.tokens_per_second, back.ettr, back.excluded_nodes) == (
        2.5,
        1234.0,
        0.91,
        ("node-c",),
    )
    assert back.last_checkpoint == view.last_checkpoint
    assert [(r.rank, r.node, r.straggler_score) for r in back.stragglers] == [(3, "node-b", 9.5)]
    assert back.ranks is None  # a TrainingJob names only its flagged ranks
    assert back.cluster is not None and (back.cluster.namespace, back.cluster.uid) == ("ml", "u-1")
    assert [c["type"] for c in back.cluster.conditions] == ["Created", "Running", "StragglerDetected"]
    assert (back.nodes, back.procs_per_node, back.progress) == (2, 2, 0.4)


def test_a_trainingjob_the_operator_has_not_admitted_has_no_phase() -> None:
    back = view_from_object({"metadata": {"name": "new", "namespace": "ml"}, "spec": {}})
    assert back.phase is None and back.as_dict(ranks=False)["phase"] is None
