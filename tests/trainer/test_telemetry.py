"""Per-rank telemetry: the contract and its parser, the step timer (with real gloo ranks), the HTTP endpoint and
the sinks, and the MFU formula against a hand computation."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from trainer.contract.telemetry import (
    METRICS,
    PHASES,
    PREFIX,
    RANK_LABELS,
    RESERVED_LABELS,
    RankLabels,
    RankSample,
    parse_rank_metrics,
)
from trainer.telemetry import (
    BatchShape,
    FlopsModel,
    MfuConfig,
    MfuMeter,
    PrometheusExporter,
    RankTelemetry,
    StepTimer,
    TelemetryConfig,
    mfu,
    parameter_counts,
    read_jsonl,
    sync_point,
    timed_collective,
)
from trainer.telemetry.mfu import resolve_peak_flops

LABELS = RankLabels(training_job="job-a", node="node-1", rank=0, local_rank=0)

# ------------------------------------------------------------------------------------------------ contract


def test_contract_names_labels_and_keys_are_consistent():
    names = [m.name for m in METRICS]
    assert len(set(names)) == len(names)
    assert all(n.startswith(PREFIX) for n in names)
    assert all((m.kind == "counter") == m.name.endswith("_total") for m in METRICS)
    for m in METRICS:
        assert not set(m.labels) & set(RESERVED_LABELS)
        assert m.labels[: len(RANK_LABELS)] == RANK_LABELS
        assert hasattr(RankSample, m.field), m.field
    keys = [k for m in METRICS for k in m.keys]
    assert len(set(keys)) == len(keys)
    assert {f"phase_seconds/{p}" for p in PHASES} <= set(keys)


@pytest.mark.parametrize("module", ["trainer.contract.telemetry", "trainer.telemetry", "trainer.faults"])
def test_telemetry_modules_do_not_import_torch(module):
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0, (
        f"{module} imports torch"
    )


def test_parser_reads_an_exposition_of_several_ranks_and_skips_foreign_series():
    texts = []
    for rank in (1, 0):
        labels = RankLabels(training_job="job-a", node=f"node-{rank}", rank=rank, local_rank=rank)
        exporter = PrometheusExporter(labels, serve=False, static={"pid": 100 + rank})
        exporter.update(
            {"step_seconds": 0.5, "phase_seconds/forward": 0.2, "text_tokens": 7, "loss": math.nan}
        )
        exporter.update({"text_tokens": 5, "checkpoint_seconds/save": 2.0, "step": 9, "lr": 1e-4})
        texts.append(exporter.exposition())
    foreign = "# TYPE python_gc_objects_collected counter\npython_gc_objects_collected_total 3.0\n"
    ranks = parse_rank_metrics(foreign + "".join(texts))
    assert [r.rank for r in ranks] == [0, 1]
    r1 = ranks[1]
    assert (r1.node, r1.local_rank, r1.pid, r1.step) == ("node-1", 1, 101, 9)
    assert r1.step_seconds == 0.5 and r1.phase_seconds == {"forward": 0.2}
    assert r1.text_tokens_total == 12 and r1.vision_tokens_total == 0  # counters add, start at 0
    assert r1.checkpoint_seconds == {"save": 2.0} and math.isnan(r1.loss)
    assert r1.own_work_seconds is None and r1.last_progress_timestamp_seconds is None  # never logged
    assert r1.seconds_since_progress(time.time()) is None


def test_parser_names_the_metric_missing_a_label():
    with pytest.raises(ValueError, match="vlctl_trainer_loss: missing label"):
        parse_rank_metrics('vlctl_trainer_loss{rank="0",node="n",training_job="j"} 1.0\n')


def test_exporter_rejects_a_label_value_outside_the_contract():
    exporter = PrometheusExporter(LABELS, serve=False)
    with pytest.raises(ValueError, match="phase_seconds/warmup"):
        exporter.update({"phase_seconds/warmup": 1.0})


# ------------------------------------------------------------------------------------------------ timer


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_timer_takes_collective_time_out_of_the_enclosing_phase():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    timer.start_step(7)
    with timer.phase("data"):
        clock.now += 1
    for _ in range(2):  # two micro-steps: phases add up
        with timer.phase("forward"):
            clock.now += 2
            with timer.collective():  # a pipeline send inside forward
                clock.now += 0.5
        with timer.phase("backward"):
            clock.now += 3
    with timer.collective(sync=True):
        clock.now += 4
    with timer.collective():
        clock.now += 0.25
    with timer.phase("optimizer"):
        clock.now += 1
    clock.now += 0.75  # untimed loop work
    t = timer.end_step()
    assert t.step == 7 and t.wall == 18.0
    assert t.phases == {"data": 1, "forward": 4, "backward": 6, "optimizer": 1, "collective_wait": 5.25}
    assert t.own_work == 12 and t.sync_wait == 4
    metrics = t.metrics()
    assert metrics["own_work_seconds"] == 12 and metrics["phase_seconds/collective_wait"] == 5.25
    assert set(metrics) <= {k for m in METRICS for k in m.keys}


def test_timer_refuses_overlapping_or_stray_phases():
    clock = FakeClock()
    timer = StepTimer(clock=clock)
    with pytest.raises(RuntimeError, match="no step started"), timer.phase("forward"):
        pass
    timer.start_step(0)
    with pytest.raises(ValueError, match="unknown phase 'collective_wait'"), timer.phase("collective_wait"):
        pass
    with (
        pytest.raises(RuntimeError, match="inside phase 'forward'"),
        timer.phase("forward"),
        timer.phase("data"),
    ):
        pass
    with timer.collective(), timer.collective():  # a collective within a collective is not counted twice
        clock.now += 1
    with pytest.raises(RuntimeError, match="step 0 has not ended"):
        timer.start_step(1)
    assert timer.end_step().phases["collective_wait"] == 1


def test_timed_collective_wraps_a_function():
    clock = FakeClock()
    timer = StepTimer(clock=clock)

    def fake_all_reduce(x):
        clock.now += 2
        return x * 2

    all_reduce = timed_collective(timer, fake_all_reduce)
    timer.start_step(0)
    with timer.phase("backward"):
        clock.now += 1
        assert all_reduce(3) == 6
    t = timer.end_step()
    assert t.phases["backward"] == 1 and t.phases["collective_wait"] == 2 and t.sync_wait == 0


def test_sync_point_without_a_process_group_returns_the_flag():
    timer = StepTimer()
    timer.start_step(0)
    assert sync_point(timer, flag=True) is True and sync_point(timer) is False


STEPS, SLOW = 6, 1.5


def _straggler_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        timer = StepTimer()
        factor = SLOW if rank == world - 1 else 1.0  # the last rank computes 1.5x as long
        grad = torch.ones(4096)
        records = []
        dist.barrier()
        for step in range(STEPS):
            timer.start_step(step)
            for phase, seconds in (("data", 0.01), ("forward", 0.03), ("backward", 0.04)):
                with timer.phase(phase):
                    time.sleep(seconds * factor)
            stop = sync_point(timer, flag=rank == 1 and step == 3)
            with timer.collective():
                dist.all_reduce(grad)
            with timer.phase("optimizer"):
                time.sleep(0.01 * factor)
            t = timer.end_step()
            records.append({"wall": t.wall, "own": t.own_work, "sync": t.sync_wait, "stop": stop, **t.phases})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(records))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_straggler_shows_in_own_work_while_wall_times_stay_equal(tmp_path, monkeypatch):
    import torch.multiprocessing as tmp

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    world = 3
    tmp.spawn(_straggler_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    ranks = [
        json.loads((tmp_path / f"rank{r}.json").read_text())[1:] for r in range(world)
    ]  # step 0 warms up

    def mean(rank: int, key: str) -> float:
        return float(np.mean([s[key] for s in ranks[rank]]))

    walls = [mean(r, "wall") for r in range(world)]
    assert 0.9 <= min(walls) / max(walls) <= 1.1
    for fast in range(world - 1):
        assert 1.3 <= mean(world - 1, "own") / mean(fast, "own") <= 1.7
        # The fast ranks wait at the sync point for the straggler, which itself hardly waits.
        assert mean(world - 1, "sync") < 0.5 * mean(fast, "sync")
    for rank in range(world):
        assert all(s["collective_wait"] >= s["sync"] for s in ranks[rank])
        assert [s["stop"] for s in ranks[rank]] == [step == 3 for step in range(1, STEPS)]  # agreed by all


# ------------------------------------------------------------------------------------------------ endpoint


def scrape(url: str) -> RankSample:
    with urllib.request.urlopen(url, timeout=5) as response:
        (sample,) = parse_rank_metrics(response.read().decode())
    return sample


def test_endpoint_serves_steps_and_progress_goes_stale_when_steps_stop(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainer.telemetry")
    telemetry = RankTelemetry(TelemetryConfig(), LABELS, run_dir=tmp_path)
    try:
        endpoint = json.loads((tmp_path / "metrics-rank0.endpoint.json").read_text())
        assert endpoint["port"] == telemetry.exporter.port > 0 and endpoint["pid"] == os.getpid()
        url = endpoint["url"]
        first = scrape(url)
        assert (first.training_job, first.node, first.rank, first.local_rank) == ("job-a", "node-1", 0, 0)
        assert first.pid == os.getpid() and first.process_start_time_seconds <= time.time()
        assert first.step is None and first.last_progress_timestamp_seconds is None
        assert first.text_tokens_total == 0

        progress = []
        for step in (1, 2, 3):
            telemetry.start_step(step)
            with telemetry.timer.phase("forward"):
                time.sleep(0.01)
            telemetry.micro_step_done()
            mid = scrape(url)  # a micro-step is progress too
            assert mid.step == (step - 1 if step > 1 else None)
            telemetry.end_step(loss=2.0 / step, text_tokens=100, vision_tokens=20, mfu=0.25)
            now = scrape(url)
            assert now.step == step and now.loss == 2.0 / step and now.mfu == 0.25
            progress += [mid.last_progress_timestamp_seconds, now.last_progress_timestamp_seconds]
        assert progress == sorted(progress) and len(set(progress)) == len(progress)
        assert (now.text_tokens_total, now.vision_tokens_total, now.micro_steps_total) == (300, 60, 3)
        assert now.phase_seconds["forward"] > 0 and now.own_work_seconds >= now.phase_seconds["forward"]

        telemetry.log_checkpoint("save", 1.5, 3)
        stalled = scrape(url)
        time.sleep(0.3)
        later = scrape(url)
        assert later.checkpoint_seconds == {"save": 1.5}
        assert later.last_progress_timestamp_seconds == stalled.last_progress_timestamp_seconds
        assert later.seconds_since_progress(time.time()) >= 0.3
    finally:
        telemetry.close()
    with pytest.raises(urllib.error.URLError):
        scrape(url)

    lines = read_jsonl(tmp_path / "metrics-rank0.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 3]
    assert (
        lines[0]["text_tokens"] == 100 and lines[0]["micro_steps"] == 1 and "phase_seconds/data" in lines[0]
    )
    assert lines[-1] == {"step": 3, "time": lines[-1]["time"], "checkpoint_seconds/save": 1.5}
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert logged[0].startswith("step 1 | loss 2.0000 |") and "mfu 25.0%" in logged[0]
    assert logged[-1] == "step 3 | checkpoint save 1.50 s"


def test_jsonl_keeps_non_finite_values_as_null_and_other_ranks_do_not_log(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainer.telemetry")
    labels = RankLabels(training_job="j", node="n", rank=3, local_rank=1)
    telemetry = RankTelemetry(TelemetryConfig(enabled=False), labels, run_dir=tmp_path)
    telemetry.start_step(0)
    telemetry.end_step(loss=math.nan, extra={"lr": 1e-4})
    telemetry.close()
    (line,) = read_jsonl(tmp_path / "metrics-rank3.jsonl")
    assert line["loss"] is None and line["lr"] == 1e-4
    assert not (tmp_path / "metrics-rank3.endpoint.json").exists()
    assert not [r for r in caplog.records if r.getMessage().startswith("step ")]


def test_exporters_keep_to_their_own_registries():
    a = RankTelemetry(TelemetryConfig(), LABELS, run_dir=None)
    b = RankTelemetry(
        TelemetryConfig(), RankLabels(training_job="job-a", node="node-1", rank=1, local_rank=1)
    )
    try:
        assert a.exporter.port != b.exporter.port
        assert [s.rank for s in parse_rank_metrics(a.exporter.exposition())] == [0]
        assert not [m for m in REGISTRY.collect() if m.name.startswith(PREFIX)]
    finally:
        a.close()
        b.close()


def test_base_port_adds_the_local_rank_and_a_busy_port_is_a_one_line_error():
    probe = PrometheusExporter(LABELS)  # find two ports that are free right now
    base = probe.port
    probe.close()
    config = TelemetryConfig(base_port=base - 1)
    labels = RankLabels(training_job="j", node="n", rank=5, local_rank=1)
    telemetry = RankTelemetry(config, labels)
    try:
        assert telemetry.exporter.port == base
        with pytest.raises(RuntimeError, match=rf"telemetry.port: cannot serve metrics on 127.0.0.1:{base}"):
            PrometheusExporter(labels, port=base)
    finally:
        telemetry.close()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"port": 70000}, "telemetry.port"),
        ({"port": 9000, "base_port": 9100}, "telemetry.base_port"),
        ({"host": ""}, "telemetry.host"),
        ({"log_every": -1}, "telemetry.log_every"),
    ],
)
def test_telemetry_config_names_the_bad_field(fields, message):
    with pytest.raises(ValueError, match=message):
        TelemetryConfig(**fields)


def test_config_and_labels_from_the_environment():
    env = {"RANK": "9", "LOCAL_RANK": "1", "VLCTL_TRAINING_JOB": "run-7", "VLCTL_METRICS_BASE_PORT": "9400"}
    labels = RankLabels.from_env(env, hostname="host-a")
    assert (labels.training_job, labels.node, labels.rank, labels.local_rank) == ("run-7", "host-a", 9, 1)
    assert TelemetryConfig.from_env(env).port_for(labels.local_rank) == 9401
    with pytest.raises(ValueError, match="VLCTL_METRICS_PORT"):
        TelemetryConfig.from_env({"VLCTL_METRICS_PORT": "http"})
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        RankLabels.from_env({"LOCAL_RANK": "x"}, hostname="h")


# ------------------------------------------------------------------------------------------------ MFU


def tiny():
    from trainer.models.qwen2_vl.config import tiny_config

    return tiny_config()


@pytest.mark.parametrize("name", ["tiny", "demo", "2b", "7b"])
def test_parameter_counts_from_the_config_match_the_model(name):
    from trainer.models.qwen2_vl.config import preset
    from trainer.models.qwen2_vl.info import count_parameters
    from trainer.models.qwen2_vl.weights import build_on_meta

    cfg = preset(name)
    assert parameter_counts(cfg) == count_parameters(build_on_meta(cfg)).parts


def tiny_batch(cfg):
    img = cfg.image_token_id
    row0 = [1] * 10 + [2] * 4 + [0, 0]  # samples of 10 and 4 tokens, 2 padding
    row1 = [3] * 4 + [img] * 4 + [4] * 4 + [0] * 4  # one sample of 12 with a 4x4-patch image, 4 padding
    seg0 = [0] * 10 + [1] * 4 + [-1] * 2
    seg1 = [0] * 12 + [-1] * 4
    return {
        "input_ids": np.array([row0, row1]),
        "segment_ids": np.array([seg0, seg1]),
        "image_grid_thw": np.array([[1, 4, 4]]),
    }


def test_flops_of_a_tiny_batch_match_a_hand_computation():
    cfg = tiny()
    shape = BatchShape.from_batch(tiny_batch(cfg), image_token_id=cfg.image_token_id, video_token_id=0)
    assert shape.sample_lengths == (10, 4, 12) and shape.vision_tokens == 4 and shape.text_tokens == 22
    # tiny: hidden 64, 2 layers, 4 heads (2 kv, head dim 16), mlp 128, vocab 512, untied;
    # ViT width 32, 2 blocks, mlp 128, patch 1176 values; merger window 128 -> 64.
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64  # 37120
    n_text = 2 * layer + 64 + 512 * 64  # layers, final norm, output projection: 107072
    block = 4 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)  # 12704
    n_vit = 32 * 1176 + 2 * block  # 63040
    n_merger = 2 * 32 + (128 * 128 + 128) + (128 * 64 + 64)  # 24832
    assert (n_text, n_vit, n_merger) == (107072, 63040, 24832)
    text = 6 * n_text * 26 + 12 * 2 * 64 * (10**2 + 4**2 + 12**2)
    vit = 6 * n_vit * 16 + 12 * 2 * 32 * 16**2  # one temporal slice of 16 patches
    merger = 6 * n_merger * 4
    assert FlopsModel.from_config(cfg).flops(shape) == text + vit + merger == 23_947_008


def test_frozen_parts_count_forward_only_or_input_gradients():
    cfg = tiny()
    shape = BatchShape(sample_lengths=(8,), vision_grids=((2, 2, 4),), vision_tokens=4)
    attn_text, attn_vit = 2 * 64 * 8**2, 2 * 32 * 2 * 8**2  # layers x width x sum l^2 (two slices of 8)
    llm_only = FlopsModel.from_config(cfg, trainable=("text",)).flops(shape)
    assert llm_only == 6 * 107072 * 8 + 12 * attn_text + 2 * 63040 * 16 + 4 * attn_vit + 2 * 24832 * 4
    vit_only = FlopsModel.from_config(cfg, trainable=("vision",)).flops(shape)
    assert vit_only == 4 * 107072 * 8 + 12 * attn_text + 6 * 63040 * 16 + 12 * attn_vit + 4 * 24832 * 4


def test_mfu_meter_on_torch_tensors_and_named_peaks():
    import torch

    cfg = tiny()
    batch = {k: torch.from_numpy(v) for k, v in tiny_batch(cfg).items()}
    meter = MfuMeter(cfg, MfuConfig(device="h100"), model_parallel_size=2)
    assert meter.peak_flops == 989e12 and meter.flops(meter.shape(batch)) == 23_947_008
    assert meter.mfu(989e12, 2.0) == 0.25
    assert mfu(312e12, 1.0, peak_flops=312e12) == 1.0
    assert resolve_peak_flops(MfuConfig(peak_flops=5e11)) == (5e11, "mfu.peak_flops")
    if not torch.cuda.is_available():
        assert resolve_peak_flops(MfuConfig()) == (1e12, "detected cpu")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"device": "tpu"}, "mfu.device"),
        ({"peak_flops": 0.0}, "mfu.peak_flops"),
        ({"trainable": ()}, "mfu.trainable"),
    ],
)
def test_mfu_config_names_the_bad_field(fields, message):
    with pytest.raises(ValueError, match=message):
        MfuConfig(**fields)
