"""Checkpoints in one process: round trip of every content kind, the commit protocol and "latest valid",
corruption fallback, retention, asynchronous saving and its staging buffers, views of flat buffers, LocalChunk
pieces, object stores (fsspec memory:// and S3
over HTTP), export to a Hugging Face directory, and the torch-free contract."""

from __future__ import annotations

import ast
import json
import logging
import random
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    LocalChunk,
    capture_rng,
    latest_valid,
    list_checkpoints,
    read_rank_state,
    restore_rng,
    verify,
)
from trainer.checkpoint import storage as storage_module
from trainer.checkpoint.export import export_hf
from trainer.checkpoint.staging import Stager, trim_storage
from trainer.models.qwen2_vl import Qwen2VL, from_pretrained, preset

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process on purpose

PACKAGE = Path(__file__).resolve().parents[2] / "trainer" / "checkpoint"


def state(step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    model = {"layer.weight": torch.randn(8, 4, generator=g), "layer.bias": torch.randn(8, generator=g).half()}
    optimizer = {"flat.exp_avg": torch.randn(40, generator=g), "flat.exp_avg_sq": torch.rand(40, generator=g),
                 "step": torch.tensor(step)}  # fmt: skip
    return model, optimizer


def zeros_like(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in tensors.items()}


def save_steps(ckpt: Checkpointer, steps) -> None:
    for step in steps:
        model, optimizer = state(step)
        ckpt.save(step, model=model, optimizer=optimizer, tokens_seen=step * 100)
        ckpt.wait()


def checkpointer(root, **changes) -> Checkpointer:
    return Checkpointer(CheckpointConfig(uri=str(root), **{"async_save": False, **changes}))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"uri": ""}, "uri"),
        ({"keep_last": 0}, "keep_last"),
        ({"interval_steps": -1}, "interval_steps"),
        ({"verify": "md5"}, "verify"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"uri": "simplecache::s3://b/x"}, "uri"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        CheckpointConfig(**{"uri": "/tmp/x", **changes})


def test_round_trip_of_every_content_kind(tmp_path):
    ckpt = checkpointer(tmp_path, interval_steps=5)
    assert [s for s in range(12) if ckpt.due(s)] == [5, 10]
    model, optimizer = state(7)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    rng = capture_rng()
    draws = (random.random(), np.random.rand(), torch.rand(1))
    scheduler = {"last_epoch": 7, "base_lrs": [0.001], "_last_lr": [0.0009]}
    config = {"model": "2b", "lr": 1e-3, "data": {"paths": ["a.jsonl"]}}
    loader = {"epoch": 1, "next_row": 123, "fingerprint": {"rows": 9}}
    ckpt.save(7, model=model, optimizer=optimizer, tokens_seen=7_000, scheduler=scheduler, config=config,
              per_rank={"rng": rng, "data_loader": loader}, extra={"loss_scale": 1.0})  # fmt: skip

    got_model, got_optimizer = zeros_like(model), zeros_like(optimizer)
    restored = checkpointer(tmp_path).load(model=got_model, optimizer=got_optimizer)
    assert restored.step == 7 and restored.tokens_seen == 7_000
    for want, got in ((model, got_model), (optimizer, got_optimizer)):
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    meta = restored.meta
    assert (meta["scheduler"], meta["config"], meta["extra"]) == (scheduler, config, {"loss_scale": 1.0})
    assert meta["layout"] == {"dp": 1, "tp": 1, "pp": 1, "world_size": 1}
    assert restored.per_rank["data_loader"] == loader
    restore_rng(restored.per_rank["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == draws


def test_commit_layout_and_manifest(tmp_path):
    save_steps(checkpointer(tmp_path), [12])
    step_dir = tmp_path / "step-00000012"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000012"]  # the tmp folder was renamed
    manifest = json.loads((step_dir / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    assert listed == {p.name for p in step_dir.iterdir()} - {"manifest.json"}
    assert {"meta.json", "rank-00000.pt", ".metadata"} <= listed
    for f in manifest["files"]:
        assert f["size"] == (step_dir / f["path"]).stat().st_size
    assert verify(str(step_dir), mode="checksum").ok


def test_unfinished_saves_are_never_listed(tmp_path):
    save_steps(checkpointer(tmp_path), [1])
    crashed = tmp_path / "step-00000002.tmp-abc123"  # a crash after the manifest, before the rename
    crashed.mkdir()
    (crashed / "manifest.json").write_text((tmp_path / "step-00000001" / "manifest.json").read_text())
    (tmp_path / "step-00000003").mkdir()  # a folder with the final name but no manifest
    assert [s.step for s in list_checkpoints(str(tmp_path))] == [1]
    assert latest_valid(str(tmp_path)).step == 1


def corrupt_largest_shard(step_dir: Path, *, truncate: bool) -> str:
    shard = max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    if truncate:
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # same size: only the checksum notices
    shard.write_bytes(bytes(data))
    return shard.name


@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "bit-flipped"])
def test_a_corrupted_shard_makes_its_step_invalid_and_resume_falls_back(tmp_path, caplog, truncate):
    save_steps(checkpointer(tmp_path), [1, 2])
    bad = corrupt_largest_shard(tmp_path / "step-00000002", truncate=truncate)
    mode = "size" if truncate else "checksum"
    if not truncate:
        assert latest_valid(str(tmp_path), verify="size").step == 2  # sizes alone miss a flipped bit
    with caplog.at_level(logging.WARNING):
        assert latest_valid(str(tmp_path), verify=mode).step == 1
    assert any("step 2" in r.message and bad in r.message for r in caplog.records)

    caplog.clear()
    ckpt = checkpointer(tmp_path, verify=mode)
    model, optimizer = zeros_like(state(1)[0]), zeros_like(state(1)[1])
    with caplog.at_level(logging.WARNING):
        assert ckpt.load(model=model, optimizer=optimizer).step == 1
    assert torch.equal(model["layer.weight"], state(1)[0]["layer.weight"])
    assert any("step 2" in r.message and bad in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match=bad):
        ckpt.load(model=model, optimizer=optimizer, step=2)


def test_keep_last_n_and_stale_tmp_cleanup(tmp_path):
    old_crash = tmp_path / "step-00000001.tmp-dead01"
    newer_tmp = tmp_path / "step-00000099.tmp-live01"  # newer than any commit: may still be written
    old_crash.mkdir(parents=True), newer_tmp.mkdir()
    ckpt = checkpointer(tmp_path, keep_last=2)
    save_steps(ckpt, [2, 3, 4, 5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005", newer_tmp.name]

    # The newest valid step survives retention even when it is older than the newest keep_last.
    corrupt_largest_shard(tmp_path / "step-00000005", truncate=True)
    ckpt.store.prune(keep_last=1)
    assert [s.step for s in list_checkpoints(str(tmp_path))] == [4, 5]
    assert latest_valid(str(tmp_path)).step == 4


def test_saving_an_existing_step_again_replaces_it(tmp_path):
    ckpt = checkpointer(tmp_path)
    save_steps(ckpt, [3])
    model, optimizer = state(30)
    ckpt.save(3, model=model, optimizer=optimizer, tokens_seen=1)
    got = zeros_like(model)
    assert ckpt.load(model=got, optimizer=zeros_like(optimizer)).tokens_seen == 1
    assert torch.equal(got["layer.weight"], model["layer.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


def test_async_save_blocks_only_while_staging(tmp_path, monkeypatch):
    release, writing = threading.Event(), threading.Event()
    original = storage_module.CheckpointStore.write_file

    def slow_write_file(self, *args, **kwargs):
        writing.set()
        assert release.wait(timeout=60)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(storage_module.CheckpointStore, "write_file", slow_write_file)
    ckpt = checkpointer(tmp_path, async_save=True)
    model, optimizer = state(1)
    saved = {k: v.clone() for k, v in model.items()}
    future = ckpt.save(1, model=model, optimizer=optimizer, tokens_seen=10)
    assert writing.wait(timeout=60)  # save() returned while the writer thread is still writing
    assert not future.done()
    model["layer.weight"].add_(1.0)  # training goes on and updates parameters in place
    assert list_checkpoints(str(tmp_path)) == []
    release.set()
    assert future.result(timeout=60).endswith("step-00000001")

    got = zeros_like(model)
    checkpointer(tmp_path).load(model=got, optimizer=zeros_like(optimizer))
    assert torch.equal(got["layer.weight"], saved["layer.weight"])  # the snapshot, not the later update


def test_a_failed_async_save_commits_nothing_and_raises_on_wait(tmp_path, monkeypatch):
    def failing_write_file(self, folder, name, data, *, rank):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage_module.CheckpointStore, "write_file", failing_write_file)
    ckpt = checkpointer(tmp_path, async_save=True)
    model, optimizer = state(1)
    ckpt.save(1, model=model, optimizer=optimizer, tokens_seen=10)
    with pytest.raises(CheckpointError, match="No space left"):
        ckpt.wait()
    assert list_checkpoints(str(tmp_path)) == []
    ckpt.save(2, model=model, optimizer=optimizer, tokens_seen=20)
    with pytest.raises(CheckpointError, match="step 2 was not saved: .*No space left"):
        ckpt.save(3, model=model, optimizer=optimizer, tokens_seen=30)  # the next save reports it too
    assert list_checkpoints(str(tmp_path)) == []


def test_a_save_waits_for_the_one_in_flight(tmp_path, monkeypatch):
    # Staging reuses the buffers the save in flight is writing from: staging step 2 before step 1 is written
    # would put step 2's values into step 1.
    release, writing = threading.Event(), threading.Event()
    original = storage_module.CheckpointStore.dcp_writer

    def held_dcp_writer(self, *args, **kwargs):
        if not release.is_set():
            writing.set()
            assert release.wait(timeout=60)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(storage_module.CheckpointStore, "dcp_writer", held_dcp_writer)
    ckpt = checkpointer(tmp_path, async_save=True)
    ckpt.save(1, model=state(1)[0], optimizer=state(1)[1], tokens_seen=1)
    assert writing.wait(timeout=60)  # step 1 is in flight and has written no shard yet
    model2, optimizer2 = state(2)
    second = threading.Thread(
        target=ckpt.save, args=(2,), kwargs={"model": model2, "optimizer": optimizer2, "tokens_seen": 2}
    )
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # waiting for step 1
    release.set()
    second.join(timeout=60)
    ckpt.close()
    for step in (1, 2):
        model, optimizer = zeros_like(state(step)[0]), zeros_like(state(step)[1])
        assert checkpointer(tmp_path).load(model=model, optimizer=optimizer, step=step).step == step
        assert torch.equal(model["layer.weight"], state(step)[0]["layer.weight"])
        assert torch.equal(optimizer["flat.exp_avg"], state(step)[1]["flat.exp_avg"])


def test_staging_copies_every_kind_into_buffers_reused_by_the_next_save():
    flat = torch.randn(30)

    def live(offset: int = 0) -> dict[str, dict[str, torch.Tensor]]:
        """What the runtime hands over: fresh LocalChunk wrappers around views of a flat buffer, every time."""
        chunks = {f"p{i}.exp_avg": LocalChunk(flat[i * 10 : (i + 1) * 10], (10 + offset,), (offset,))
                  for i in range(3)}  # fmt: skip
        return {"model": dict(model), "optimizer": chunks}

    model = {
        "bf16": torch.randn(4, 3).bfloat16(),
        "transposed": torch.randn(3, 5).t(),  # not contiguous
        "scalar": torch.tensor(7),
        "empty": torch.zeros(0, 4),
        "conjugate": torch.randn(3, dtype=torch.cfloat).conj(),  # a lazy view: its bytes are not its values
    }

    def check(staged: dict, state_: dict) -> None:
        assert staged.keys() == state_.keys()
        for group, tensors in state_.items():
            assert staged[group].keys() == tensors.keys()
            for name, want in tensors.items():
                got = staged[group][name]
                if isinstance(want, LocalChunk):
                    assert isinstance(got, LocalChunk) and got.offsets == want.offsets, name
                    assert got.shape == want.shape, name
                    got, want = got.local, want.local
                assert got.dtype == want.dtype and torch.equal(got, want), name

    stager = Stager()
    first = stager.stage(live())
    check(first, live())
    snapshot = {k: v.local.clone() for k, v in first["optimizer"].items()}
    flat.add_(1.0)  # the next step updates the state in place: the staged copy keeps the old values
    assert all(torch.equal(first["optimizer"][k].local, v) for k, v in snapshot.items())

    second = stager.stage(live())
    check(second, live())
    for group in first:  # the same buffers (and wrappers, the placement being the same) as the first save
        assert all(second[group][name] is first[group][name] for name in first[group])

    model["bf16"] = torch.randn(5, 3).bfloat16()  # a new shape: a new buffer
    dropped = weakref.ref(first["model"].pop("empty"))
    del model["empty"]
    third = stager.stage(live(offset=4))  # a new placement: the same buffers, re-wrapped
    check(third, live(offset=4))
    assert third["model"]["bf16"] is not second["model"]["bf16"]
    assert third["optimizer"]["p0.exp_avg"].local is second["optimizer"]["p0.exp_avg"].local
    del second
    assert dropped() is None  # a tensor the state no longer has keeps no buffer


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_views_of_flat_buffers_are_written_alone_and_restored_exactly(tmp_path, async_save):
    # ZeRO-1 optimizer state: every fragment is a view of one flat buffer per moment.
    flat = torch.randn(3000)

    def fragments(buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            f"p{i}.exp_avg": LocalChunk(buffer[i * 1000 : (i + 1) * 1000], (1000,), (0,)) for i in range(3)
        }

    trimmed = trim_storage({"optimizer": fragments(flat)})["optimizer"]["p1.exp_avg"].local
    assert trimmed.data_ptr() == flat[1000:].data_ptr()  # the same memory, not a copy
    assert trimmed.untyped_storage().nbytes() == trimmed.nbytes == 4000

    ckpt = checkpointer(tmp_path, async_save=async_save)
    ckpt.save(1, model={"w": flat[10:20]}, optimizer=fragments(flat), tokens_seen=0)
    ckpt.close()
    shards = sum(p.stat().st_size for p in (tmp_path / "step-00000001").glob("*.distcp"))
    assert flat.nbytes < shards < 2 * flat.nbytes  # each view alone, not the 12 KB buffer under each of them
    target, model = torch.zeros(3000), {"w": torch.zeros(10)}
    checkpointer(tmp_path).load(model=model, optimizer=fragments(target))
    assert torch.equal(target, flat) and torch.equal(model["w"], flat[10:20])


def test_bad_state_is_refused_at_save_naming_it(tmp_path):
    ckpt = checkpointer(tmp_path)
    model, optimizer = state(1)
    with pytest.raises(ValueError, match="optimizer\\['lr'\\]"):
        ckpt.save(1, model=model, optimizer={**optimizer, "lr": 0.1}, tokens_seen=0)
    with pytest.raises(ValueError, match="per_rank"):
        ckpt.save(1, model=model, optimizer=optimizer, tokens_seen=0, per_rank={"obj": threading.Event()})
    with pytest.raises(ValueError, match="config"):
        ckpt.save(1, model=model, optimizer=optimizer, tokens_seen=0, config={"path": Path("/x")})


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_rank_files_load_only_with_weights_only(tmp_path):
    save_steps(checkpointer(tmp_path), [1])
    rank_file = tmp_path / "step-00000001" / "rank-00000.pt"
    torch.save({"evil": _Payload()}, rank_file)
    with pytest.raises(Exception, match="[Ww]eights only"):
        read_rank_state(str(tmp_path / "step-00000001"), 0)
    # Every torch.load in the package passes weights_only=True.
    for source in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert kwargs.get("weights_only") == "True", f"{source.name}: {ast.unparse(node)}"


def test_object_store_uses_the_manifest_as_the_commit(tmp_path):
    uri = "memory://checkpoint-test/run"
    ckpt = checkpointer(uri, keep_last=2)
    fs = ckpt.store.fs
    fs.mkdir("/checkpoint-test/run/step-00000001")  # a save that died before its manifest
    fs.pipe_file("/checkpoint-test/run/step-00000001/__0_0.distcp", b"partial")
    save_steps(ckpt, [2])
    assert [s.step for s in list_checkpoints(uri)] == [2]
    assert not fs.exists("/checkpoint-test/run/step-00000001")  # stale: older than the newest commit
    save_steps(ckpt, [3, 4])
    assert [s.step for s in list_checkpoints(uri)] == [3, 4]
    model, optimizer = zeros_like(state(4)[0]), zeros_like(state(4)[1])
    assert checkpointer(uri, verify="checksum").load(model=model, optimizer=optimizer).step == 4
    assert torch.equal(optimizer["flat.exp_avg"], state(4)[1]["flat.exp_avg"])
    fs.rm("/checkpoint-test", recursive=True)


@pytest.fixture
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"endpoint_url": f"http://{host}:{port}"}
    server.stop()


def test_s3_round_trip_over_http(s3_endpoint):
    import s3fs

    s3fs.S3FileSystem(**s3_endpoint, skip_instance_cache=True).mkdir("ckpt-bucket")
    uri = "s3://ckpt-bucket/run-1"
    ckpt = checkpointer(uri, storage_options=s3_endpoint, keep_last=1, async_save=True)
    save_steps(ckpt, [1, 2])
    assert [s.step for s in list_checkpoints(uri, storage_options=s3_endpoint)] == [2]
    assert latest_valid(uri, verify="checksum", storage_options=s3_endpoint).step == 2
    model, optimizer = zeros_like(state(2)[0]), zeros_like(state(2)[1])
    assert ckpt.load(model=model, optimizer=optimizer).step == 2
    assert torch.equal(model["layer.weight"], state(2)[0]["layer.weight"])
    ckpt.close()


def test_local_chunks_save_and_load_any_piece(tmp_path):
    full = torch.arange(24.0).reshape(6, 4)
    with pytest.raises(ValueError, match="does not fit"):
        LocalChunk(full[:3], (6, 4), (4, 0))
    piece = LocalChunk(full[2:5].clone(), (6, 4), (2, 0))
    assert piece.shape == (6, 4)
    with pytest.raises(TypeError, match="no tensor operations"):
        piece.sum()  # it holds only some of its elements: computing with it would be wrong

    whole = LocalChunk(full.clone(), (6, 4), (0, 0))
    ckpt = checkpointer(tmp_path, async_save=True)
    ckpt.save(1, model={"w": whole}, optimizer={}, tokens_seen=0)
    whole.local.zero_()  # after staging: the save holds the snapshot
    ckpt.wait()
    target = torch.zeros(6, 4)
    ckpt.load(model={"w": LocalChunk(target[1:4, 1:3], (6, 4), (1, 1))}, optimizer={})
    assert torch.equal(target[1:4, 1:3], full[1:4, 1:3]) and target.sum() == full[1:4, 1:3].sum()


def test_export_writes_a_hugging_face_directory(tmp_path):
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = Qwen2VL(cfg)
    state = model.state_dict()
    qkv = "visual.blocks.0.attn.qkv.weight"  # saved blocked, as tensor-parallel training saves it
    state[qkv] = state[qkv].reshape(3, -1, state[qkv].shape[1])
    ckpt = checkpointer(tmp_path / "ckpt")
    ckpt.save(5, model=state, optimizer={}, tokens_seen=0)
    out = export_hf(str(tmp_path / "ckpt" / "step-00000005"), tmp_path / "hf", config=cfg)
    loaded = from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(CheckpointError, match="do not match"):
        export_hf(str(tmp_path / "ckpt" / "step-00000005"), tmp_path / "hf2", config=preset("demo"))


def test_contract_module_is_torch_free():
    code = "import sys, trainer.contract.checkpoint; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
