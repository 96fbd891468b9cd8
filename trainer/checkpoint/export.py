"""Export a training checkpoint's model weights as a Hugging Face Qwen2-VL directory.

    export_hf("/ckpt/run-7/step-00012000", "/models/run-7-12k", config=preset("2b"), dtype=torch.bfloat16)

Decisions:

* One process, whatever layout the checkpoint was saved with: the model entries are read at their global
  shapes from DCP's metadata, which assembles DTensor shards of any split. Optimizer state is never read.
* The model config comes from the caller (the run's model config), because meta.json's training config is
  the trainer's schema, not this module's. Names and shapes must match it exactly; a mismatch raises
  CheckpointError naming the keys (model weights are saved under their Qwen2VL.state_dict() names). The one
  accepted difference is a blocked shape (see save.py: the fused ViT qkv under tensor parallelism), reshaped.
* The step is verified against its manifest first (sizes by default), like every load.
* Written by trainer.models.qwen2_vl.save_pretrained: released config layout and on-disk key names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from trainer.checkpoint.load import CheckpointError
from trainer.checkpoint.storage import CheckpointStore
from trainer.contract.checkpoint import VerifyMode, verify
from trainer.models.qwen2_vl import Qwen2VLConfig, save_pretrained
from trainer.models.qwen2_vl.weights import build_on_meta

_PREFIX = "model."  # the Checkpointer saves {"model": ..., "optimizer": ...}; DCP joins names with dots


def _blocked(saved: tuple[int, ...], expected: tuple[int, ...] | None) -> bool:
    """Whether `saved` is `expected` with one dimension split into (blocks, rows per block): the blocked view
    tensor-parallel training saves the fused qkv under, which a reshape undoes exactly."""
    if expected is None or len(saved) != len(expected) + 1:
        return False
    return any(
        saved[:d] == expected[:d]
        and saved[d] * saved[d + 1] == expected[d]
        and saved[d + 2 :] == expected[d + 1 :]
        for d in range(len(expected))
    )


def read_model_state(
    step_uri: str, *, verify_mode: VerifyMode = "size", storage_options: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Every model tensor of a step at its global shape, on CPU."""
    if problem := verify(step_uri, mode=verify_mode, storage_options=storage_options).problem:
        raise CheckpointError(f"cannot export an invalid checkpoint: {problem}")
    reader = CheckpointStore(step_uri, storage_options).dcp_reader(step_uri)
    entries = reader.read_metadata().state_dict_metadata
    state = {
        fqn.removeprefix(_PREFIX): torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for fqn, md in entries.items()
        if fqn.startswith(_PREFIX) and isinstance(md, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"{step_uri}: the checkpoint holds no model tensors")
    dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return state


def export_hf(
    step_uri: str,
    out_dir: str | os.PathLike,
    *,
    config: Qwen2VLConfig,
    dtype: torch.dtype | None = None,
    verify_mode: VerifyMode = "size",
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write config.json and safetensors of a checkpoint's model; `dtype` None keeps the saved dtype."""
    state = read_model_state(step_uri, verify_mode=verify_mode, storage_options=storage_options)
    model = build_on_meta(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = config.text.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)
    state = {
        k: v.reshape(expected[k]) if _blocked(tuple(v.shape), expected.get(k)) else v
        for k, v in state.items()
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{step_uri}: model weights do not match the config: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, shape mismatch {mismatched[:8]}"
        )
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    save_pretrained(model, out_dir)
    return Path(out_dir)


def model_config_of(step_uri: str, *, storage_options: Mapping[str, Any] | None = None) -> Qwen2VLConfig:
    """The model config of a checkpoint written by trainer.train: its training config names a preset or the
    Hugging Face directory the run started from."""
    from trainer.contract.checkpoint import read_meta
    from trainer.models.qwen2_vl import load_config, preset

    name = read_meta(step_uri, storage_options=storage_options)["config"]["model"]["name"]
    return load_config(name) if Path(name).is_dir() else preset(name)


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.checkpoint.export CHECKPOINTS_OR_STEP OUT [--dtype bfloat16]`."""
    import argparse
    import sys

    from trainer.contract.checkpoint import latest_valid

    parser = argparse.ArgumentParser(
        prog="python -m trainer.checkpoint.export",
        description="Export a checkpoint's model as a Hugging Face directory.",
    )
    parser.add_argument("source", help="a step folder, or a checkpoint root (its newest valid step is used)")
    parser.add_argument("out", help="the Hugging Face directory to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    args = parser.parse_args(argv)
    step_uri = args.source
    if not Path(step_uri, "meta.json").exists():
        newest = latest_valid(step_uri)
        if newest is None:
            print(f"error: {step_uri}: no valid checkpoint", file=sys.stderr)
            return 2
        step_uri = newest.uri
    try:
        out = export_hf(
            step_uri,
            args.out,
            config=model_config_of(step_uri),
            dtype=None if args.dtype is None else getattr(torch, args.dtype),
        )
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
