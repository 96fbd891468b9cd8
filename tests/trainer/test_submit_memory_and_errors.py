"""Issue 11 on the trainer's side: the submit-time memory estimate agrees with the models and passes the
examples; a missing sample file names where it was looked for; running out of host memory reads as an OOM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from controller.failures import OOM_LOG_PATTERN
from controller.spec import load_spec, parse_spec
from trainer.contract.training import load_training_config

REPO = Path(__file__).resolve().parents[2]
GiB = 1024**3


@pytest.mark.parametrize("name", ["2b", "7b", "72b", "demo", "tiny", "mini"])
def test_preset_shapes_match_the_models(name: str):
    from trainer.contract.memory import PRESET_SHAPES
    from trainer.models.qwen2_vl import preset
    from trainer.models.qwen2_vl.info import count_parameters
    from trainer.models.qwen2_vl.weights import build_on_meta

    cfg = preset(name)
    parts = count_parameters(build_on_meta(cfg)).parts
    shape = PRESET_SHAPES[name]
    assert shape.merger == parts["vision.merger"]
    assert shape.vision == sum(n for k, n in parts.items() if k.startswith("vision.")) - shape.merger
    assert shape.text == sum(n for k, n in parts.items() if k.startswith("text."))
    t = cfg.text
    assert (shape.hidden, shape.layers, shape.intermediate, shape.vocab) == (
        t.hidden_size,
        t.num_hidden_layers,
        t.intermediate_size,
        t.vocab_size,
    )


def test_the_examples_pass_and_the_issue_value_does_not():
    from controller.memory import check_memory
    from trainer.contract.memory import estimate_rank_memory

    for path in sorted((REPO / "examples" / "jobs").glob("*.yaml")):
        check_memory(load_spec(path))  # on this machine, whatever its size
        assert estimate_rank_memory(load_spec(path).training).total < 2 * GiB
    for path in sorted((REPO / "examples").glob("*.yaml")):
        config = load_training_config(str(path))
        assert estimate_rank_memory(config).total < 2 * GiB, path
    config = load_training_config(
        str(REPO / "examples" / "train.yaml"), ["data.rows_per_step=10000000", "parallel.dp=2"]
    )
    need = estimate_rank_memory(config)
    assert need.total > 24 * GiB and need.field == "training.data.rows_per_step"


def test_gpu_ranks_count_only_the_host_side():
    from controller.memory import check_memory

    spec = yaml.safe_load((REPO / "examples" / "jobs" / "local-demo.yaml").read_text())
    spec["resources"].update(gpus_per_node=1, memory="512Mi")
    spec["fault_tolerance"]["recovery"] = "restart"  # in-place snapshots are host memory (the next test)
    check_memory(parse_spec(spec))  # model state and activations are on the device
    spec["resources"]["gpus_per_node"] = 0
    with pytest.raises(
        ValueError, match=r"^training\.model\.name: .*resources\.memory = 512Mi.*more model-parallel"
    ):
        check_memory(parse_spec(spec))


def test_in_place_snapshots_are_counted_and_named_when_they_do_not_fit():
    """A snapshot is a rank's ZeRO-1 share of the fp32 master weights and Adam moments (118 MB for `mini` under
    dp=2, as trainer/recovery measured it), held four times (own and peer's, each double-buffered), and it stays
    in host memory on a GPU too; a spare's processes count as ranks on this machine."""
    from controller.memory import check_memory
    from trainer.contract.memory import SNAPSHOT_BUFFERS, estimate_rank_memory, snapshot_bytes

    mini = 19_609_984  # its parameters
    assert snapshot_bytes(mini, param_dtype="float32", zero_shards=2) == 117_659_904
    spec = yaml.safe_load((REPO / "examples" / "jobs" / "local-demo.yaml").read_text())
    spec["resources"].update(gpus_per_node=1)
    spec["fault_tolerance"] = {**spec.get("fault_tolerance", {}), "recovery": "in-place", "hot_spares": 1}
    parsed = parse_spec(spec)
    plain = estimate_rank_memory(parsed.training, on_gpu=True)
    need = estimate_rank_memory(parsed.training, on_gpu=True, in_place=True)
    assert plain.snapshots == 0 and need.snapshots > 0 and need.total == plain.total + need.snapshots
    assert need.snapshots % SNAPSHOT_BUFFERS == 0 and need.field == "fault_tolerance.recovery"
    spec["resources"]["memory"] = (
        f"{(plain.total + need.snapshots // 2) * spec['resources']['procs_per_node']}"
    )
    check_memory(parse_spec({**spec, "fault_tolerance": {"recovery": "restart"}}))  # fits without snapshots
    with pytest.raises(
        ValueError, match=r"^fault_tolerance\.recovery: .*in-place snapshots .*recovery: restart"
    ):
        check_memory(parse_spec(spec))


def test_the_default_recovery_is_in_place_unless_its_snapshots_do_not_fit(tmp_path: Path):
    """`recovery` left unset: in-place; at submit, a job whose snapshots alone would not fit takes restart, said
    in one line. Asked for explicitly, in-place is refused instead (the spec said what it wants)."""
    from controller.spec import SpecError, prepare_submission
    from trainer.contract.memory import estimate_rank_memory

    sample = tmp_path / "samples.jsonl"
    sample.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    spec = yaml.safe_load((REPO / "examples" / "jobs" / "local-demo.yaml").read_text())
    spec["training"]["data"]["paths"] = [str(sample)]
    spec["resources"].update(gpus_per_node=1)
    parsed = parse_spec(spec)
    assert parsed.fault_tolerance.recovery == "in-place" and not parsed.fault_tolerance.recovery_chosen()
    plain = estimate_rank_memory(parsed.training, on_gpu=True)
    need = estimate_rank_memory(parsed.training, on_gpu=True, in_place=True)
    spec["resources"]["memory"] = str(
        (plain.total + need.snapshots // 2) * spec["resources"]["procs_per_node"]
    )
    notices: list[str] = []
    stored = prepare_submission(parse_spec(spec), base_dir=tmp_path, source="job.yaml", notice=notices.append)
    assert stored.fault_tolerance.recovery == "restart"
    assert parse_spec(stored.model_dump(mode="json")).fault_tolerance.recovery == "restart"  # as stored
    (line,) = notices
    assert line.startswith("job.yaml: fault_tolerance.recovery: restart (in-place snapshots would not fit: ")
    spec["fault_tolerance"]["recovery"] = "in-place"
    with pytest.raises(SpecError, match=r"^job\.yaml: fault_tolerance\.recovery: .*in-place snapshots"):
        prepare_submission(parse_spec(spec), base_dir=tmp_path, source="job.yaml", notice=notices.append)
    spec["resources"]["memory"] = "1Mi"  # too small for restart as well: that error, not the snapshots'
    spec["fault_tolerance"].pop("recovery")
    with pytest.raises(SpecError, match=r"^job\.yaml: training\."):
        prepare_submission(parse_spec(spec), base_dir=tmp_path, source="job.yaml", notice=notices.append)
    assert len(notices) == 1


def test_a_missing_sample_file_names_where_it_was_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from trainer.data.formats import iter_jsonl

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        list(iter_jsonl("data/synth/train/grounding.jsonl"))
    assert str(tmp_path / "data" / "synth" / "train" / "grounding.jsonl") in str(err.value)


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
    ],
    ids=["MemoryError", "torch-cpu"],
)
def test_running_out_of_host_memory_prints_an_oom_line(tmp_path, monkeypatch, capfd, error):
    import trainer.runtime
    from trainer import train

    class Exhausted:
        def __init__(self, config):
            raise error

    monkeypatch.setattr(trainer.runtime, "Run", Exhausted)
    for key, value in {"RANK": "3", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"data": {"paths": ["x.jsonl"]}, "run_dir": str(tmp_path / "run")}))
    with pytest.raises(type(error)):
        train.main([str(config)])
    line = capfd.readouterr().err.strip().splitlines()[-1]
    assert OOM_LOG_PATTERN.search(line) and "rank 3" in line, line
    assert os.environ["RANK"] == "3"
