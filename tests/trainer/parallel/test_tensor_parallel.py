"""Tensor parallelism on real processes (gloo): the sharded model computes the single-device loss and gradients,
and replicated weights never diverge across tp ranks, even when one rank's replicated gradients are perturbed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from parallel_harness import collate, make_row, model_config, run, spawn

from trainer.models.qwen2_vl import Qwen2VL
from trainer.parallel import ParallelDims, init_distributed
from trainer.parallel.tensor import apply_tensor_parallel, replicated_in_sync, sync_replicated_grads

pytestmark = pytest.mark.multiproc


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _parity_worker(rank, world, port, out_dir):
    mesh = init_distributed(ParallelDims(tp=2))
    cfg = model_config()
    torch.manual_seed(0)
    full = Qwen2VL(cfg)
    with torch.no_grad():  # random biases and norms too, so none is a no-op
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sharded = copy.deepcopy(full)
    layouts = apply_tensor_parallel(sharded, cfg, tp_rank=mesh.coords.tp, tp_size=2, group=mesh.tp_group)
    rng = np.random.default_rng(1)
    batch = collate([make_row(rng, cfg) for _ in range(3)])
    assert "pixel_values" in batch and "pixel_values_videos" in batch
    expected = full(**batch, return_logits=False).loss
    expected.backward()
    got = sharded(**batch, return_logits=False).loss
    got.backward()
    out = {"loss": (float(expected), float(got)), "max_grad_err": 0.0, "sharded": 0}
    for name, p in sharded.named_parameters():
        layout = layouts[name]
        g = layout.unshard(_gather(p.grad, mesh.tp_group)) if layout.sharded else p.grad
        ref = dict(full.named_parameters())[name].grad
        out["max_grad_err"] = max(
            out["max_grad_err"], float((g - ref).abs().max() / (ref.abs().max() + 1e-12))
        )
        out["sharded"] += layout.sharded
    # Replicated gradients differ between tp ranks once one rank perturbs its own; the sync makes them bitwise equal.
    replicated = [p for name, p in sharded.named_parameters() if not layouts[name].sharded]
    if mesh.coords.tp == 1:
        for p in replicated:
            p.grad.mul_(1 + 1e-3)
    grads = [p.grad for p in replicated]
    out["grads_differ_before"] = not replicated_in_sync(grads, mesh.tp_group)
    sync_replicated_grads(replicated, mesh.tp_group)
    out["grads_equal_after"] = replicated_in_sync(grads, mesh.tp_group)
    # The checker sees a single flipped bit in one rank's weights.
    out["params_equal"] = replicated_in_sync(replicated, mesh.tp_group)
    if mesh.coords.tp == 1:
        with torch.no_grad():
            w = replicated[0].view(-1)
            w[0] = torch.nextafter(w[0], torch.tensor(float("inf")))
    out["params_equal_after_flip"] = replicated_in_sync(replicated, mesh.tp_group)
    return out


def test_tensor_parallel_matches_single_device_and_syncs_replicated_grads(tmp_path):
    for out in spawn(_parity_worker, 2, tmp_path):
        expected, got = out["loss"]
        assert got == pytest.approx(expected, abs=1e-5)
        assert out["max_grad_err"] < 1e-4
        assert out["sharded"] > 0
        assert out["grads_differ_before"] and out["grads_equal_after"]
        assert out["params_equal"] and not out["params_equal_after_flip"]


def _perturb_replicated_grads_on_tp_rank_1(engine):
    """Make tp rank 1's replicated gradients differ from rank 0's every step, as a non-deterministic kernel would."""
    if engine.mesh.coords.tp != 1:
        return
    for p in engine.replicated:
        if p.requires_grad:
            p.register_hook(lambda g: g * (1 + 1e-4))


def test_replicated_weights_stay_bitwise_equal_under_perturbed_grads(tmp_path):
    options = {
        "steps": 4,
        "perturb": _perturb_replicated_grads_on_tp_rank_1,
        "engine": {"check_replicated_every": 1},
    }
    ranks = run(tmp_path, {"tp": 2}, options)
    assert all(r["replicated_in_sync"] for r in ranks)
    assert ranks[0]["losses"] == ranks[1]["losses"]
