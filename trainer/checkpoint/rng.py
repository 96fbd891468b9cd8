"""Every random generator a rank draws from, as plain data that torch.load(weights_only=True) accepts.

Covered: Python's `random`, NumPy's legacy global generator (`np.random.*`), torch's CPU generator and, when
CUDA is initialised, every CUDA device's generator. Generators that code creates itself (np.random.default_rng,
torch.Generator) belong to their owners' state, e.g. the data loader's. Restoring onto a machine with fewer
CUDA devices than were saved is an error: the streams would silently differ.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Undo capture_rng(); ValueError naming the part that does not fit."""
    missing = [k for k in ("python", "numpy", "torch", "cuda") if k not in state]
    if missing:
        raise ValueError(f"rng state: missing {', '.join(missing)}")
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if cuda := state["cuda"]:
        if torch.cuda.device_count() < len(cuda):
            raise ValueError(
                f"rng state: saved for {len(cuda)} CUDA devices, {torch.cuda.device_count()} visible"
            )
        torch.cuda.set_rng_state_all(cuda)
