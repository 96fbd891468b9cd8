"""Metrics ingest against the trainer's real writers: JSONL files from `JsonlSink` (torn lines, older attempts,
checkpoint lines, late files), live `RankTelemetry` endpoints (one of them down), and the real Prometheus binary
scraping in-process exporters. Plus the attempt in what the trainer writes, and bounded state at 16,384 ranks."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from controller.hangs import HangConfig, detect_hang
from controller.ingest import (
    CheckpointOp,
    EndpointTelemetry,
    JsonlTelemetry,
    PrometheusTelemetry,
    RankState,
    TelemetrySource,
)
from controller.stragglers import StragglerConfig, StragglerDetector
from controller.supervision import step_progress
from trainer.contract.telemetry import ENDPOINT_FILE, ENV_ATTEMPT, JSONL_FILE, RankLabels
from trainer.telemetry import JsonlSink, RankTelemetry, TelemetryConfig, read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from state_size import jsonl_state_nbytes  # noqa: E402

PROMETHEUS = "/usr/bin/prometheus"


def step_metrics(step: int, *, own: float = 0.4, tokens: int = 100, loss: float = 2.0) -> dict[str, float]:
    """What RankTelemetry.end_step hands its sinks, with chosen values."""
    phases = {"data": 0.1 * own, "forward": 0.3 * own, "backward": 0.5 * own, "optimizer": 0.1 * own}
    return {
        "step_seconds": own + 0.1,
        **{f"phase_seconds/{p}": v for p, v in phases.items()},
        "phase_seconds/collective_wait": 0.1,
        "own_work_seconds": own,
        "sync_wait_seconds": 0.05,
        "text_tokens": tokens,
        "vision_tokens": tokens // 4,
        "micro_steps": 2,
        "last_progress_timestamp_seconds": 1000.0 + step,
        "loss": loss,
        "lr": 1e-4,  # outside the contract: the ingest skips it
    }


def write_steps(run_dir: Path, rank: int, attempt: int | None, steps, **kw) -> None:
    sink = JsonlSink(run_dir / JSONL_FILE.format(rank=rank), attempt=attempt)
    for step in steps:
        sink.log(step_metrics(step, **kw), step)
    sink.close()


def write_checkpoint(
    run_dir: Path, rank: int, attempt: int, operation: str, seconds: float, step: int
) -> None:
    sink = JsonlSink(run_dir / JSONL_FILE.format(rank=rank), attempt=attempt)
    sink.log({f"checkpoint_seconds/{operation}": seconds}, step)
    sink.close()


# ------------------------------------------------------------------------------------------------ JSONL


def test_ranks_given_to_a_spare_are_reported_on_the_spare(tmp_path):
    """In-place recovery promoted a spare into node local-1's place: rank 1's state and its next samples name
    the spare, not the lost node (a straggler or hang report must point at the machine that runs the rank)."""
    write_steps(tmp_path, 1, 1, (0, 1))
    source = JsonlTelemetry(tmp_path, 2, 1, nodes=["local-0", "local-1"])
    assert source.poll(now=10.0).ranks[1].node == "local-1"
    source.reassign(["local-0", "spare-0"])
    write_steps(tmp_path, 1, 1, (2,))
    update = source.poll(now=11.0)
    assert update.ranks[1].node == "spare-0" and [s.node for s in update.steps] == ["spare-0"]
    with pytest.raises(ValueError, match="nodes: expected 2 names"):
        source.reassign(["spare-0"])


def test_jsonl_tail_reads_new_lines_of_the_attempt_only(tmp_path):
    write_steps(tmp_path, 0, 1, range(3), own=9.0)  # the previous attempt's lines: never read
    write_steps(tmp_path, 0, 2, (3, 4))
    write_checkpoint(tmp_path, 0, 2, "stage", 0.7, 5)  # logged under the index of the step it precedes
    write_steps(tmp_path, 0, 2, (5,))
    path0 = tmp_path / JSONL_FILE.format(rank=0)
    torn = json.dumps({"step": 6, "time": 1.0, "attempt": 2, **step_metrics(6)}) + "\n"
    with path0.open("a") as f:  # a line caught mid-write
        f.write(torn[:40])

    source: TelemetrySource = JsonlTelemetry(tmp_path, 2, 2, nodes=["local-0", "local-1"])
    first = source.poll(now=50.0)
    assert [(s.rank, s.step, s.is_checkpoint_step) for s in first.steps] == [
        (0, 3, False),
        (0, 4, False),
        (0, 5, True),
    ]
    sample = first.steps[0]
    assert sample.attempt == 2 and sample.node == "local-0" and sample.own_work_seconds == 0.4
    assert sample.phase_seconds == pytest.approx(
        {"data": 0.04, "forward": 0.12, "backward": 0.2, "optimizer": 0.04}
    )
    assert sample.wall_seconds == pytest.approx(0.5)
    assert first.checkpoint_ops == [CheckpointOp(rank=0, step=5, operation="stage", seconds=0.7)]
    assert list(first.ranks) == [0]  # rank 1's file does not exist yet
    state = first.ranks[0]
    assert (state.step, state.last_progress, state.updated_at, state.node) == (5, 1005.0, 50.0, "local-0")
    assert (state.text_tokens_total, state.vision_tokens_total) == (300, 75)
    assert state.tokens_per_second == pytest.approx(125 / 0.5)
    assert state.checkpoint_seconds == {"stage": 0.7} and state.phase_seconds["collective_wait"] == 0.1
    assert source.skipped_lines == 3 and source.bad_lines == 0

    with path0.open("a") as f:  # the torn line completes; the late rank starts
        f.write(torn[40:])
    write_steps(tmp_path, 0, 2, (7,), loss=1.0)
    write_steps(tmp_path, 1, 2, (3, 4, 5, 6), loss=3.0)
    write_checkpoint(tmp_path, 1, 2, "save", 2.5, 6)  # after its step's line
    write_steps(tmp_path, 1, 2, (7,), loss=3.0)
    second = source.poll(now=60.0)
    assert [(s.rank, s.step) for s in second.steps] == [(0, 6), (0, 7)] + [(1, s) for s in range(3, 8)]
    assert [(s.rank, s.step) for s in second.steps if s.is_checkpoint_step] == [(1, 6)]
    assert second.ranks[1].checkpoint_seconds == {"save": 2.5} and second.ranks[1].node == "local-1"
    assert step_progress(second.ranks.values()) == (8, 2.0)  # steps done: both ranks finished step index 7
    assert [s.tokens_per_second for s in second.ranks.values()] == pytest.approx([125 / 0.5] * 2)
    assert [s.step_seconds for s in second.ranks.values()] == pytest.approx([0.5] * 2)

    third = source.poll(now=70.0)
    assert third.steps == [] and third.checkpoint_ops == [] and third.ranks == second.ranks
    assert source.bad_lines == 0


def test_a_checkpoint_line_after_its_step_marks_the_step_and_bad_lines_are_counted(tmp_path):
    write_steps(tmp_path, 0, 0, (0, 1))
    write_checkpoint(tmp_path, 0, 0, "save", 1.5, 1)
    with (tmp_path / JSONL_FILE.format(rank=0)).open("a") as f:
        f.write("not json\n")
        f.write('{"step": "x", "step_seconds": 1.0}\n')
    write_steps(tmp_path, 0, 0, (2,))
    update = JsonlTelemetry(tmp_path, 1, 0).poll(now=1.0)
    assert [(s.step, s.is_checkpoint_step) for s in update.steps] == [(0, False), (1, True), (2, False)]
    assert update.ranks[0].step == 2


def test_a_line_over_the_limit_is_dropped_and_reads_catch_up_over_polls(tmp_path):
    write_steps(tmp_path, 0, 0, (0,))
    with (tmp_path / JSONL_FILE.format(rank=0)).open("a") as f:
        f.write(json.dumps({"step": 1, "time": 1.0, "pad": "x" * 3000}) + "\n")
    write_steps(tmp_path, 0, 0, (1, 2))
    source = JsonlTelemetry(tmp_path, 1, 0, max_line_bytes=1000, max_poll_bytes=1000)
    steps = [s.step for _ in range(8) for s in source.poll(now=1.0).steps]
    assert steps == [0, 1, 2] and source.bad_lines == 1
    assert jsonl_state_nbytes(source) < 4096  # the long line was never held whole


def test_jsonl_start_attempt_keeps_offsets_and_a_recreated_file_is_read_from_its_start(tmp_path):
    write_steps(tmp_path, 0, 1, (0, 1))
    source = JsonlTelemetry(tmp_path, 1, 1)
    assert [s.step for s in source.poll(now=1.0).steps] == [0, 1]
    source.start_attempt(2)
    write_steps(tmp_path, 0, 1, (2,))  # a late line of the attempt that ended
    write_steps(tmp_path, 0, 2, (2, 3))
    update = source.poll(now=2.0)
    assert [(s.step, s.attempt) for s in update.steps] == [(2, 2), (3, 2)] and source.skipped_lines == 1

    (tmp_path / JSONL_FILE.format(rank=0)).unlink()  # the run folder was cleaned
    write_steps(tmp_path, 0, 2, (4,))
    assert [s.step for s in source.poll(now=3.0).steps] == [4]


def test_start_at_end_seeds_the_state_without_replaying_steps(tmp_path):
    write_steps(tmp_path, 0, 3, range(10))
    write_checkpoint(tmp_path, 0, 3, "stage", 0.5, 10)
    with (tmp_path / JSONL_FILE.format(rank=0)).open("a") as f:
        f.write('{"step": 10, "time": 1.0, "attempt": 3, "step_seconds": 0.5')  # torn
    source = JsonlTelemetry(tmp_path, 2, 3, start_at_end=True, seed_bytes=700)
    update = source.poll(now=5.0)
    assert update.steps == [] and update.checkpoint_ops == []
    assert update.ranks[0].step == 9 and update.ranks[0].checkpoint_seconds == {"stage": 0.5}
    with (tmp_path / JSONL_FILE.format(rank=0)).open("a") as f:
        f.write(', "own_work_seconds": 0.4}\n')
    (sample,) = source.poll(now=6.0).steps
    assert (sample.step, sample.own_work_seconds, sample.is_checkpoint_step) == (10, 0.4, True)


def test_jsonl_feeds_the_straggler_detector_and_hang_detection(tmp_path):
    nodes = ["local-0", "local-0", "local-1", "local-1"]
    source = JsonlTelemetry(tmp_path, 4, 1, nodes=nodes)
    config = StragglerConfig(window=5, warmup_steps=0, persistence=2, min_samples=3, baseline_windows=1)
    detector = StragglerDetector(config, num_ranks=4)
    results = []
    for chunk in range(4):  # four polls of five steps; rank 3 computes 1.5x as long
        steps = range(5 * chunk, 5 * chunk + 5)
        for rank in range(4):
            write_steps(tmp_path, rank, 1, steps, own=0.6 if rank == 3 else 0.4)
        results += detector.observe_samples(source.poll(now=float(chunk)).steps)
    flagged = {r.rank for result in results for r in result.stragglers}
    assert flagged == {3}

    update = source.poll(now=0.0)
    verdict = detect_hang(
        [update.ranks[r].progress() for r in sorted(update.ranks)],
        now=1019.0 + 700,
        launched_at=900.0,
        median_step_seconds=statistics.median(s.step_seconds for s in update.ranks.values()),
        config=HangConfig(),
    )
    assert verdict.hung and verdict.phase == "training" and verdict.since == 1019.0


def test_jsonl_outage_reports_are_signs_of_life_until_a_step_commits_again(tmp_path):
    """A rank waiting for its checkpoint storage after its last step writes outage lines: the hang check sees them
    (controller/hangs.py); a step line with the gauge back at 0 ends the outage."""
    source = JsonlTelemetry(tmp_path, 1, 1, nodes=["local-0"])
    write_steps(tmp_path, 0, 1, range(3))
    sink = JsonlSink(tmp_path / JSONL_FILE.format(rank=0), attempt=1)
    sink.log({"checkpoint_storage_outage_seconds": 12.5}, 2)
    sink.close()
    state = source.poll(now=0.0).ranks[0]
    assert state.storage_outage_seconds == 12.5 and state.storage_wait_at is not None
    assert state.progress().alive_at == state.storage_wait_at > state.last_progress
    write_steps(tmp_path, 0, 1, [3])  # a step line carries the gauge (0: saves commit again)
    sink = JsonlSink(tmp_path / JSONL_FILE.format(rank=0), attempt=1)
    sink.log({**step_metrics(4), "checkpoint_storage_outage_seconds": 0.0}, 4)
    sink.close()
    state = source.poll(now=1.0).ranks[0]
    assert state.storage_outage_seconds == 0.0 and state.storage_wait_at is None


def test_the_trainer_writes_the_attempt_from_the_environment(tmp_path):
    env = {"RANK": "1", "LOCAL_RANK": "1", ENV_ATTEMPT: "4", "VLCTL_NODE": "n"}
    telemetry = RankTelemetry.from_env(TelemetryConfig(log_every=0), run_dir=tmp_path, environ=env)
    telemetry.start_step(0)
    telemetry.end_step(loss=1.0)
    telemetry.log_checkpoint("stage", 0.1, 1)
    telemetry.close()
    assert [line["attempt"] for line in read_jsonl(tmp_path / JSONL_FILE.format(rank=1))] == [4, 4]
    assert json.loads((tmp_path / ENDPOINT_FILE.format(rank=1)).read_text())["attempt"] == 4
    with pytest.raises(ValueError, match=ENV_ATTEMPT):
        RankTelemetry.from_env(TelemetryConfig(enabled=False), environ={ENV_ATTEMPT: "two"})


# ------------------------------------------------------------------------------------------------ endpoints


def rank_telemetry(
    run_dir: Path | None, rank: int, *, attempt: int | None, job: str = "job-e"
) -> RankTelemetry:
    labels = RankLabels(training_job=job, node=f"node-{rank // 2}", rank=rank, local_rank=rank % 2)
    return RankTelemetry(TelemetryConfig(log_every=0, jsonl=False), labels, run_dir=run_dir, attempt=attempt)


def take_step(telemetry: RankTelemetry, step: int, *, loss: float = 1.0) -> None:
    telemetry.start_step(step)
    with telemetry.timer.phase("forward"):
        time.sleep(0.001)
    telemetry.micro_step_done()
    telemetry.end_step(loss=loss, text_tokens=100, vision_tokens=10)


def assert_state_matches(state: RankState, telemetry: RankTelemetry) -> None:
    held = telemetry.exporter.snapshot()
    assert state.step == held["step"] and state.pid == os.getpid()
    assert state.step_seconds == held["step_seconds"] and state.own_work_seconds == held["own_work_seconds"]
    assert state.phase_seconds == {
        k.split("/")[1]: v for k, v in held.items() if k.startswith("phase_seconds/")
    }
    assert state.loss == held["loss"] and state.last_progress == held["last_progress_timestamp_seconds"]
    assert state.process_start == held["process_start_time_seconds"]
    assert (state.text_tokens_total, state.vision_tokens_total) == (
        held["text_tokens"],
        held["vision_tokens"],
    )
    assert state.node == telemetry.labels.node


def test_endpoints_are_scraped_and_a_dead_one_is_a_counted_failure(tmp_path):
    ranks = [rank_telemetry(tmp_path, r, attempt=1) for r in range(3)]
    stale = rank_telemetry(tmp_path, 3, attempt=0)  # a previous attempt's endpoint, still answering
    source = EndpointTelemetry(tmp_path, 5, 1, timeout_seconds=2.0, max_workers=2)  # rank 4 never starts
    try:
        for step in range(3):
            for t in ranks:
                take_step(t, step, loss=1.0 + t.labels.rank)
        take_step(stale, 7)
        first = source.poll(now=10.0)
        assert sorted((s.rank, s.step) for s in first.steps) == [
            (0, 2),
            (1, 2),
            (2, 2),
        ]  # the newest step only
        assert sorted(first.ranks) == [0, 1, 2] and first.failed == {} and first.steps[0].attempt == 1
        for t in ranks:
            assert_state_matches(first.ranks[t.labels.rank], t)
        assert first.ranks[0].updated_at == 10.0 and first.ranks[0].failures == 0
        assert step_progress(first.ranks.values()) == (3, pytest.approx(2.0))  # step index 2 done
        second = source.poll(now=11.0)
        assert second.steps == []  # no step since

        ranks[0].log_checkpoint("stage", 0.25, 3)  # the stage before step 3
        take_step(ranks[0], 3)
        take_step(ranks[1], 3)
        ranks[2].close()  # rank 2's process is gone
        third = source.poll(now=12.0)
        assert sorted((s.rank, s.step, s.is_checkpoint_step) for s in third.steps) == [
            (0, 3, True),
            (1, 3, False),
        ]
        assert third.checkpoint_ops == [CheckpointOp(rank=0, step=3, operation="stage", seconds=0.25)]
        assert list(third.failed) == [2] and source.failures_total == 1
        assert third.ranks[2] == replace(second.ranks[2], failures=1)  # the last state read, kept
        assert third.ranks[1].tokens_per_second == pytest.approx(110 / third.ranks[1].step_seconds)
    finally:
        for t in (*ranks, stale):
            t.close()
        source.close()


def test_a_poll_scrapes_at_most_its_budget_of_ranks_in_turn(tmp_path):
    # Every rank every poll would cost a core per thousand ranks: past `max_scrapes_per_poll` the ranks take
    # turns, and a rank not scraped keeps its last state.
    ranks = [rank_telemetry(tmp_path, r, attempt=1) for r in range(5)]
    source = EndpointTelemetry(tmp_path, 5, 1, max_workers=2, max_scrapes_per_poll=2)
    try:
        turns = []
        for poll in range(4):
            for t in ranks:
                take_step(t, poll)
            update = source.poll(now=float(poll))
            turns.append(sorted(s.rank for s in update.steps))
            assert update.failed == {}
        assert turns == [[0, 1], [2, 3], [0, 4], [1, 2]]
        assert sorted(update.ranks) == [0, 1, 2, 3, 4]
        assert (update.ranks[3].step, update.ranks[3].updated_at) == (1, 1.0)  # scraped in poll 1, kept
        with pytest.raises(ValueError, match="max_scrapes_per_poll"):
            EndpointTelemetry(tmp_path, 5, 1, max_scrapes_per_poll=0)
    finally:
        for t in ranks:
            t.close()
        source.close()


# ------------------------------------------------------------------------------------------------ Prometheus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


def wait_for(predicate, *, deadline_seconds: float, what: str):
    deadline = time.monotonic() + deadline_seconds
    while True:
        try:
            value = predicate()
        except (OSError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def exporters() -> Iterator[list[RankTelemetry]]:
    ranks = [rank_telemetry(None, r, attempt=None, job="job-p") for r in range(2)]
    yield ranks
    for t in ranks:
        t.close()


@pytest.fixture
def prometheus(tmp_path, exporters) -> Iterator[str]:
    """A real Prometheus scraping the exporters every second; its base URL."""
    if not os.access(PROMETHEUS, os.X_OK):
        reason = f"no Prometheus binary at {PROMETHEUS} (make venv installs Debian's prometheus package)"
        if os.environ.get("VLCTL_REQUIRE_PROMETHEUS") == "1":  # CI: a missing server fails the run
            pytest.fail(reason)
        pytest.skip(reason)
    targets = ", ".join(f"'127.0.0.1:{t.exporter.port}'" for t in exporters)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        f"scrape_configs: [{{job_name: trainers, static_configs: [{{targets: [{targets}]}}]}}]\n"
    )
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={address}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    base = f"http://{address}"
    try:
        wait_for(
            lambda: (
                (active := get_json(f"{base}/api/v1/targets")["data"]["activeTargets"])
                and len(active) == len(exporters)
                and all(t["health"] == "up" for t in active)
            ),
            deadline_seconds=15,
            what="Prometheus targets up",
        )
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)


@pytest.mark.slow
def test_prometheus_api_gives_what_the_exporters_hold(prometheus, exporters):
    for step in range(2):
        for t in exporters:
            take_step(t, step, loss=1.5 + t.labels.rank)
    source = PrometheusTelemetry(prometheus, "job-p", 1, 2)

    def both_at(step: int):
        update = source.poll(now=time.time())
        return update if all(update.ranks.get(r) and update.ranks[r].step == step for r in (0, 1)) else None

    first = wait_for(lambda: both_at(1), deadline_seconds=10, what="step 1 in Prometheus")
    for t in exporters:
        assert_state_matches(first.ranks[t.labels.rank], t)
    raw = source.fetch()
    assert {"job", "instance"} <= set(raw[0]["metric"])  # set by Prometheus, and ignored

    exporters[0].log_checkpoint("stage", 0.25, 2)
    take_step(exporters[0], 2)
    seen = []
    wait_for(
        lambda: seen.extend(source.poll(now=time.time()).steps) or seen, deadline_seconds=10, what="step 2"
    )
    assert [(s.rank, s.step, s.is_checkpoint_step, s.attempt) for s in seen] == [(0, 2, True, 1)]
    held = exporters[0].exporter.snapshot()["last_progress_timestamp_seconds"]
    state = wait_for(
        lambda: (s := source.poll(now=time.time()).ranks[0]).last_progress == held and s,
        deadline_seconds=10,
        what="step 2's values in Prometheus",
    )
    assert_state_matches(state, exporters[0])

    # Processes started before the attempt's launch belong to an earlier attempt.
    later = PrometheusTelemetry(prometheus, "job-p", 2, 2, launched_at=time.time() + 3600)
    assert later.poll(now=time.time()).ranks == {}


def test_prometheus_unreachable_is_an_error_not_an_exception():
    source = PrometheusTelemetry(f"http://127.0.0.1:{free_port()}", "job-p", 1, 2, timeout_seconds=1)
    update = source.poll(now=1.0)
    assert update.error and "127.0.0.1" in update.error and update.ranks == {}
    assert source.failures_total == 1
    with pytest.raises(ValueError, match="base_url"):
        PrometheusTelemetry("localhost:9090", "job-p", 1, 2)


def test_prometheus_vector_picks_the_newest_process_of_a_rank():
    def series(name: str, value: float, instance: str, **labels) -> dict:
        base = {"training_job": "j", "node": "n", "rank": "0", "local_rank": "0", "instance": instance}
        return {"metric": {"__name__": f"vlctl_trainer_{name}", **base, **labels}, "value": [1.0, str(value)]}

    results = [
        series("process_start_time_seconds", 100.0, "old:1"),
        series("step", 50, "old:1"),
        series("process_start_time_seconds", 200.0, "new:1"),
        series("step", 3, "new:1"),
        series("loss", math.nan, "new:1"),
        series("phase_seconds", 0.5, "new:1", phase="forward"),
        series("step", 1, "x:1", rank="9"),  # outside the job's ranks
    ]
    (sample,) = PrometheusTelemetry("http://p:9090", "j", 1, 2).rank_samples(results)
    assert (sample.step, sample.process_start_time_seconds, sample.phase_seconds) == (
        3,
        200.0,
        {"forward": 0.5},
    )
    assert math.isnan(sample.loss)
    assert PrometheusTelemetry("http://p:9090", "j", 1, 2, launched_at=300.0).rank_samples(results) == []


# ------------------------------------------------------------------------------------------------ scale


@pytest.mark.slow
def test_state_per_rank_stays_bounded_at_16384_ranks(tmp_path):
    try:
        check_bounded_state(tmp_path / "run", num_ranks=16_384)
    finally:
        shutil.rmtree(tmp_path / "run")  # 16k files: not left for pytest's temp-folder rotation


def check_bounded_state(tmp_path: Path, num_ranks: int) -> None:
    tmp_path.mkdir()
    source = JsonlTelemetry(tmp_path, num_ranks, 1)
    sizes = []
    for chunk in range(3):
        for rank in range(num_ranks):
            path = tmp_path / JSONL_FILE.format(rank=rank)
            lines = [
                {"step": s, "time": 1.0, "attempt": 1, **step_metrics(s)}
                for s in range(2 * chunk, 2 * chunk + 2)
            ]
            lines.append({"step": 2 * chunk + 2, "time": 1.0, "attempt": 1, "checkpoint_seconds/stage": 0.5})
            with path.open("a") as f:
                f.write("".join(json.dumps(line) + "\n" for line in lines))
        update = source.poll(now=float(chunk))
        assert len(update.steps) == 2 * num_ranks and len(update.ranks) == num_ranks
        sizes.append(jsonl_state_nbytes(source))
    per_rank = sizes[-1] / num_ranks
    # Constant as steps accumulate; a cursor and a row of the columns (about 320 bytes at 1,024 ranks and at
    # 16,384), where an object per rank held about 1 KB.
    assert sizes[-1] == sizes[1] and per_rank < 512


@pytest.mark.parametrize("slow_rank", [21, None])
def test_the_prometheus_path_at_a_15s_scrape_flags_a_slow_rank_and_nothing_else(slow_rank):
    # A 15 s scrape of 1 s steps: each rank reports one step in 15. The detector learns that cadence and judges
    # windows of 20 samples; issue 14 measured 0 windows closed in 600 steps before it did.
    # The query API's answer comes from bench.fleet's synthetic ranks instead of a server (the real server is
    # tested above; here the cadence is the point: 90 polls 15 s apart would take 22 minutes).
    from bench.fleet import Fleet, FleetPrometheus
    from controller.supervision import LiveAttempt

    fleet = Fleet(num_ranks=64, slow_rank=slow_rank, seed=3)
    source = FleetPrometheus(fleet, 15.0, launched_at=fleet.t0 - 30)
    config = StragglerConfig()  # the job defaults: window 20, persistence 3, warm-up 20 steps
    live = LiveAttempt(
        job_id=1,
        job_name="scale",
        attempt=1,
        num_ranks=64,
        dp=64,
        gang=None,
        telemetry=source,
        launched_at=fleet.t0,
        stragglers=config,
        hang=HangConfig(),
    )
    flagged_at, windows = None, []
    for k in range(1, 90):  # 22 minutes of training, polled at the scrape interval
        source.prepare(fleet.t0 + 15.0 * k)
        update = source.poll(source.now)
        assert update.error is None
        newly, closed = live.absorb(update)
        windows += closed
        if flagged_at is None and newly:
            flagged_at = (source.now - fleet.t0, [r.rank for r in newly])
        assert not live.check_hang(source.now).hung
    assert live._detector.stride == 15
    assert len(windows) >= 3 and all(w.num_ranks == 64 for w in windows[1:])
    if slow_rank is None:
        assert flagged_at is None and not live.flagged
        return
    assert flagged_at is not None and flagged_at[1] == [slow_rank]
    # warm-up + the first window (cadence learned) + 3 windows of 20 x 15 steps, and one poll's slack
    assert flagged_at[0] <= 20 + 20 + 3 * 20 * 15 + 30
    assert live.flagged[slow_rank].slowdown == pytest.approx(1.3, abs=0.1)


def test_every_rank_state_field_is_a_column_and_a_step_line_keeps_those_it_does_not_carry(tmp_path):
    # Rank states live in columns (controller.ingest.columns): a RankState field without a column would read
    # back as its default. A new field fails the round trip here until the columns carry it.
    import dataclasses

    from controller.ingest import RankColumns

    kept = {
        "rank": 1,
        "attempt": 2,
        "node": "node-with-a-long-name",
        "pid": 77,
        "process_start": 5.0,
        "failures": 2,
        "checkpoint_seconds": {"stage": 0.5},
        "storage_outage_seconds": 0.0,
        "storage_wait_at": None,
    }
    full = RankState(
        **{**kept, "storage_wait_at": 8.0},
        step=3,
        last_progress=8.5,
        step_seconds=1.5,
        own_work_seconds=1.25,
        phase_seconds={"forward": 0.5, "collective_wait": 0.25},
        loss=2.5,
        text_tokens_total=10.0,
        vision_tokens_total=1.0,
        tokens_per_second=7.0,
        updated_at=1.0,
    )
    assert all(getattr(full, f.name) != f.default for f in dataclasses.fields(RankState)), (
        "a field left unset"
    )
    columns = RankColumns(2, attempt=2)
    columns.set_state(full)
    assert columns.state(1) == full and dict(columns.view()) == {1: full}

    # A step line over that state: what the line carries changes, the rest stays.
    source = JsonlTelemetry(tmp_path, 2, 2)
    source._columns.set_state(replace(full, storage_wait_at=None))
    line = {
        "attempt": 2,
        "step": 4,
        "time": 9.0,
        "step_seconds": 1.0,
        "own_work_seconds": 0.5,
        "phase_seconds/forward": 0.5,
        "loss": 2.0,
        "text_tokens": 5,
        "vision_tokens": 1,
    }
    (tmp_path / JSONL_FILE.format(rank=1)).write_text(json.dumps(line) + "\n")
    update = source.poll(now=20.0)
    new = update.ranks[1]
    assert {k: getattr(new, k) for k in kept} == kept
    assert (new.step, new.last_progress, new.text_tokens_total, new.updated_at) == (4, 9.0, 15.0, 20.0)
    assert new.phase_seconds == {"forward": 0.5} and new.tokens_per_second == 6.0
    (sample,) = update.steps
    assert sample.step == 4 and sample.phase_seconds == {"forward": 0.5} and sample.node == kept["node"]
