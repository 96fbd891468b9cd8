"""The loader: exact resume (same and other data-parallel sizes, across epochs, with workers) and bad data."""

from __future__ import annotations

import io
import json
import logging

import av
import numpy as np
import pytest
from packed_samples import CFG, make_sample, packing, random_samples

from trainer.data.bad_samples import BadSample, TooManyBadSamples
from trainer.data.image import load_image
from trainer.data.loader import LoaderConfig, PackedLoader
from trainer.data.source import InMemorySource

PACKING = packing(row_len=64, max_vision_tokens_per_row=24)
SAMPLES = random_samples(48, seed=0)  # 17-18 rows an epoch, so 4-row steps cross epoch boundaries


def source_of(samples):
    return InMemorySource(samples, image_token_id=CFG.image_token_id, video_token_id=CFG.video_token_id)


SOURCE = source_of(SAMPLES)


def make_loader(source=SOURCE, **changes) -> PackedLoader:
    config = {"seed": 3, "rows_per_step": 4, "micro_batch_rows": 1, **changes}
    return PackedLoader(source, packing=PACKING, config=LoaderConfig(**config))


def take_steps(loader: PackedLoader, steps: int) -> list[list[tuple]]:
    """The next `steps` steps of a loader: per step, (rows, {name: array}) for each micro-batch on this rank."""
    cfg = loader.config
    batches = iter(loader)
    out: list[list[tuple]] = []
    for _ in range(steps * (cfg.rows_per_rank // cfg.rows_per_micro_batch)):
        mb = next(batches)
        if mb.index == 0:
            out.append([])
        out[-1].append((tuple(mb.rows), {k: v.numpy().copy() for k, v in mb.inputs.items()}))
    return out


def assert_same_rows(got: list[tuple], want: list[tuple]) -> None:
    assert [rows for rows, _ in got] == [rows for rows, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))  # a state must survive any checkpoint format


def test_resume_at_the_same_dp_size_is_bitwise_exact():
    reference = take_steps(make_loader(), 12)
    epochs = [{p.epoch for rows, _ in step for p in rows} for step in reference]
    assert len(set().union(*epochs)) >= 3  # the run crosses epoch boundaries
    assert any(len(e) == 2 for e in epochs[5:])  # and a resumed step spans one

    first = make_loader()
    head = take_steps(first, 5)
    state = roundtrip(first.state_dict())
    resumed = make_loader()
    resumed.load_state_dict(state)
    assert resumed.counters.as_dict() == first.counters.as_dict() and state["step"] == 5
    tail = take_steps(resumed, 7)
    for got, want in zip(head + tail, reference, strict=True):
        assert_same_rows(got, want)
    assert resumed.counters.samples_seen > first.counters.samples_seen


def global_steps(loaders: list[PackedLoader], steps: int) -> list[list[tuple]]:
    """Run every rank of one data-parallel group (one row per micro-batch); per step, the union of the ranks'
    rows in global order."""
    per_rank = [take_steps(loader, steps) for loader in loaders]
    dp = len(loaders)
    merged = []
    for s in range(steps):
        rows = [None] * (len(per_rank[0][s]) * dp)
        for k, rank_steps in enumerate(per_rank):
            rows[k::dp] = rank_steps[s]  # rank k trains the step's rows k, k + dp, ...
        merged.append(rows)
    return merged


def test_resume_at_other_dp_sizes_continues_the_same_global_batches(caplog):
    reference = take_steps(make_loader(), 9)
    ranks = [make_loader(dp_rank=k, dp_size=2) for k in range(2)]
    for got, want in zip(global_steps(ranks, 3), reference[:3], strict=True):
        assert_same_rows(got, want)
    single = make_loader()
    take_steps(single, 3)
    assert (
        ranks[0].counters + ranks[1].counters
    ).as_dict() == single.counters.as_dict()  # ranks' shares add up
    states = [roundtrip(r.state_dict()) for r in ranks]
    first_row = reference[3][0][0][0]
    assert {(s["epoch"], s["next_row"], s["step"]) for s in states} == {(first_row.epoch, first_row.row, 3)}
    for dp in (1, 4):
        resumed = [make_loader(dp_rank=k, dp_size=dp) for k in range(dp)]
        with caplog.at_level(logging.WARNING):
            for loader in resumed:
                loader.load_state_dict(states[0])
        assert "counters restart from zero" in caplog.text
        for got, want in zip(global_steps(resumed, 6), reference[3:], strict=True):
            assert_same_rows(got, want)


def test_workers_and_their_kind_do_not_change_the_data():
    reference = take_steps(make_loader(micro_batch_rows=2), 6)
    with make_loader(micro_batch_rows=2, num_workers=2, prefetch=3) as threads:
        head = take_steps(threads, 2)  # the workers have prefetched past the save point by now
        state = roundtrip(threads.state_dict())
    with make_loader(micro_batch_rows=2, num_workers=2, worker_type="process") as processes:
        processes.load_state_dict(state)
        tail = take_steps(processes, 4)
    for got, want in zip(head + tail, reference, strict=True):
        assert_same_rows(got, want)


# ------------------------------------------------------------------------------------------------- bad data


class FlakySource(InMemorySource):
    """Some samples fail to encode the way real ones do, with the formats layer's wrapping around the cause."""

    def __init__(self, samples, failing: dict[int, str], folder):
        super().__init__(samples, image_token_id=CFG.image_token_id, video_token_id=CFG.video_token_id)
        self.failing, self.folder = failing, folder

    def encode(self, index):
        kind = self.failing.get(index)
        if kind is None:
            return super().encode(index)
        where = self.costs[index].source
        try:
            if kind == "missing":
                load_image(self.folder / f"gone-{index}.jpg")
            elif kind == "corrupt_image":
                load_image(b"GIF89a, or so it says")
            elif kind == "undecodable_video":
                av.open(io.BytesIO(bytes(64)))
            elif kind == "malformed":
                try:
                    json.loads('{"messages": [')
                except json.JSONDecodeError as e:
                    raise ValueError(f"invalid JSON: {e.msg}") from None
            elif kind == "bug":
                raise TypeError("a bug, not bad data")
            else:
                raise BadSample(kind, f"the image is {kind}")
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e
        raise AssertionError("unreachable")


FAILING = {
    3: "missing",
    7: "corrupt_image",
    11: "undecodable_video",
    15: "malformed",
    19: "missing",
    23: "blurry",
}


def bad_data_samples():
    rng = np.random.default_rng(5)
    return [
        *SAMPLES[:40],
        make_sample(40, rng, prompt=60, images=[(1, 4, 4)]),  # image pads straddle the row end: too_long
        make_sample(41, rng, prompt=2, images=[(1, 4, 6)] * 5),
    ]  # 30 vision tokens, budget 24


def test_bad_samples_become_padding_counted_by_reason_and_logged_once(caplog, tmp_path):
    samples = bad_data_samples()
    flaky = make_loader(
        FlakySource(samples, FAILING, tmp_path),
        rows_per_step=1,
        max_bad_fraction=0.5,
        min_samples_before_bad_check=1,
    )
    clean = make_loader(source_of(samples), rows_per_step=1)
    rows = flaky.stream.plan(0).num_rows + flaky.stream.plan(1).num_rows  # exactly two epochs
    reference = take_steps(clean, rows)
    caplog.clear()  # the clean run logs its plan's drops too
    with caplog.at_level(logging.WARNING, logger="trainer.data.bad_samples"):
        got = take_steps(flaky, rows)
    for [(_, a)], [(_, b)] in zip(got, reference, strict=True):
        kept = a["segment_ids"] >= 0  # the plan is the same; a failed sample's slot became padding
        assert np.array_equal(a["input_ids"][kept], b["input_ids"][kept])
        assert (a["input_ids"][~kept] == CFG.pad_token_id).all()
    counts = flaky.counters.as_dict()
    bad = {reason: 2 * n for reason, n in
           {"missing": 2, "corrupt_image": 1, "undecodable_video": 1, "malformed": 1, "blurry": 1,
            "too_long": 1, "too_much_vision": 1}.items()}  # fmt: skip
    assert {k.removeprefix("bad/"): v for k, v in counts.items() if k.startswith("bad/")} == bad
    assert counts["samples_seen"] == 2 * len(samples) and counts["samples_bad"] == 16
    assert counts["samples_trained"] == 2 * (len(samples) - 8) and counts["rows"] == rows
    good = [s for s in samples if s.index not in FAILING and s.index < 40]
    assert counts["tokens"] == 2 * sum(len(s) for s in good)
    assert counts["padding_tokens"] == rows * PACKING.row_len - counts["tokens"]
    logged = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert len(logged) == 8  # once per sample, not once per epoch
    assert (
        "skipping sample 3 (missing) from mem://sample/3: ValueError: mem://sample/3: cannot load image"
        in ("\n".join(logged))
    )
    assert any("sample 41 (too_much_vision)" in line and "30 vision tokens" in line for line in logged)


def test_too_many_bad_samples_stops_with_the_fraction_and_top_reasons(tmp_path):
    failing = {i: "missing" if i % 3 else "corrupt_image" for i in range(0, 48, 2)}  # half the samples
    loader = make_loader(
        FlakySource(SAMPLES, failing, tmp_path), max_bad_fraction=0.2, min_samples_before_bad_check=30
    )
    with pytest.raises(
        TooManyBadSamples,
        match=r"of \d+ samples seen are bad \(\d+\.\d%, over max_bad_fraction "
        r"20\.0%\); top reasons: missing \d+, corrupt_image \d+",
    ):
        take_steps(loader, 100)
    assert loader.counters.samples_seen >= 30
    patient = make_loader(
        FlakySource(SAMPLES, failing, tmp_path), max_bad_fraction=0.2, min_samples_before_bad_check=10**6
    )
    take_steps(patient, 10)  # below min_samples_before_bad_check nothing is checked


def test_a_bug_in_the_source_is_not_bad_data(tmp_path):
    loader = make_loader(FlakySource(SAMPLES, dict.fromkeys(range(48), "bug"), tmp_path))
    with pytest.raises(TypeError, match="a bug"):
        take_steps(loader, 1)


# ------------------------------------------------------------------------------------------------- state and config


def test_load_state_dict_refuses_another_plan():
    loader = make_loader()
    take_steps(loader, 2)
    state = loader.state_dict()
    cases = [
        (
            PackedLoader(
                SOURCE,
                packing=packing(row_len=48, max_vision_tokens_per_row=24),
                config=LoaderConfig(seed=3, rows_per_step=4),
            ),
            "row_len 64 in the checkpoint, 48 now",
        ),
        (make_loader(seed=4), "seed is 3 in the checkpoint but 4"),
        (make_loader(source_of(SAMPLES[:40])), "costs_crc32 .*num_samples 48 in the checkpoint, 40 now"),
        (make_loader(shuffle=False), "shuffle True in the checkpoint, False now"),
    ]
    for other, message in cases:
        with pytest.raises(ValueError, match=message):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="missing next_row"):
        loader.load_state_dict({k: v for k, v in state.items() if k != "next_row"})
    with pytest.raises(ValueError, match="epoch 0 has no row 999"):
        loader.load_state_dict({**state, "epoch": 0, "next_row": 999})
    stale = iter(loader)
    loader.load_state_dict(state)
    with pytest.raises(RuntimeError, match="superseded"):
        next(stale)


def test_an_epoch_with_no_rows_names_the_reason():
    loader = PackedLoader(SOURCE, packing=packing(row_len=4, truncate=False), config=LoaderConfig())
    with pytest.raises(ValueError, match=r"epoch 0 has no rows: all 48 samples were dropped \(too_long 48\)"):
        next(iter(loader))


@pytest.mark.parametrize(("changes", "field"), [
    ({"rows_per_step": 0}, "rows_per_step"),
    ({"rows_per_step": 6, "dp_size": 4}, "rows_per_step"),
    ({"dp_rank": 2, "dp_size": 2, "rows_per_step": 2}, "dp_rank"),
    ({"rows_per_step": 8, "dp_size": 2, "micro_batch_rows": 3}, "micro_batch_rows"),
    ({"num_workers": -1}, "num_workers"),
    ({"worker_type": "fiber"}, "worker_type"),
    ({"prefetch": 0}, "prefetch"),
    ({"max_bad_fraction": 1.5}, "max_bad_fraction"),
    ({"min_samples_before_bad_check": -1}, "min_samples_before_bad_check"),
    ({"seed": -1}, "seed"),
])  # fmt: skip
def test_loader_config_names_the_bad_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        LoaderConfig(**changes)
