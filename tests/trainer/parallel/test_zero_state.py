"""Optimizer and model state of the engine: a save/load round trip at the same layout resumes bit for bit, and
ZeRO-1 fragments saved at dp=2, assembled into whole tensors, load at dp=1 and continue with the same losses."""

from __future__ import annotations

import pickle

import pytest
import torch
from parallel_harness import build, spawn, step_inputs

from trainer.parallel import ParallelDims

pytestmark = pytest.mark.multiproc

OPTIONS = {"steps": 4}


def _copy(state):
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _copy(v) for k, v in state.items()}
    return state


def _save_then_reload(rank, world, port, out_dir):
    engine, batches, micro = build(ParallelDims(dp=2), OPTIONS)
    for rows in batches[:2]:
        engine.train_step(step_inputs(engine, rows, micro))
    model, optim = _copy(engine.model_state_dict()), _copy(engine.optimizer_state_dict())
    losses = [engine.train_step(step_inputs(engine, rows, micro)).loss for rows in batches[2:]]
    engine.load_model_state_dict(model)
    engine.load_optimizer_state_dict(optim)
    again = [engine.train_step(step_inputs(engine, rows, micro)).loss for rows in batches[2:]]
    return {"losses": losses, "again": again, "model": model, "optim": optim}


def _resume_at_dp1(rank, world, port, out_dir, state_file):
    model, optim = pickle.loads(state_file.read_bytes())
    engine, batches, micro = build(ParallelDims(), OPTIONS)
    engine.load_model_state_dict(model)
    engine.load_optimizer_state_dict(optim)
    return {"losses": [engine.train_step(step_inputs(engine, rows, micro)).loss for rows in batches[2:]]}


def _assemble(optims: list[dict]) -> dict:
    """Whole flattened tensors per parameter from every dp rank's fragments."""
    state = {}
    for optim in optims:
        for name, frag in optim["fragments"].items():
            for key, piece in optim["state"][name].items():
                full = state.setdefault(name, {}).setdefault(key, torch.full((frag.total,), float("nan")))
                full[frag.start : frag.start + frag.numel] = piece
    assert not any(t.isnan().any() for s in state.values() for t in s.values())
    return {"step": optims[0]["step"], "state": state}


def test_state_round_trip_and_dp_resharding(tmp_path):
    saved = spawn(_save_then_reload, 2, tmp_path / "dp2")
    for r in saved:
        assert r["again"] == r["losses"], "reloading the saved state resumes bit for bit"
        assert r["optim"]["step"] == 2
        owned = [s for s in r["optim"]["state"].values() if s["exp_avg"].numel()]
        assert owned and all(torch.count_nonzero(s["exp_avg"]) for s in owned)
    optim = _assemble([r["optim"] for r in saved])
    state_file = tmp_path / "state.pkl"
    state_file.write_bytes(pickle.dumps((saved[0]["model"], optim)))
    (resumed,) = spawn(_resume_at_dp1, 1, tmp_path / "dp1", state_file)
    assert resumed["losses"] == pytest.approx(saved[0]["losses"], abs=1e-5, rel=0)
