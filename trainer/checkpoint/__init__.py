"""Sharded training checkpoints: DCP shards per rank, asynchronous saves, a manifest-and-rename commit, resume
from the newest valid step, and export of the model weights as a Hugging Face directory.

Modules: save (Checkpointer: the interface the training loop uses), load (resume), chunk (LocalChunk: a rank's
piece of a global tensor), staging (CPU snapshot for async saves), storage (local and fsspec roots, commit), group (the checkpoint process group), rng (random
generator state), outage (saves that fail because the storage cannot be written: retry, give up), export
(Hugging Face directory). The layout and "latest valid" lookup, which the controller
uses without torch, live in trainer.contract.checkpoint.
"""

from trainer.contract.checkpoint import CheckpointConfig, latest_valid, list_checkpoints, verify

from .chunk import LocalChunk
from .load import CheckpointError, Restored, read_rank_state
from .outage import CheckpointStorageError, StorageOutage, storage_failure
from .rng import capture_rng, restore_rng
from .save import Checkpointer

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointStorageError",
    "Checkpointer",
    "LocalChunk",
    "Restored",
    "StorageOutage",
    "capture_rng",
    "latest_valid",
    "list_checkpoints",
    "read_rank_state",
    "restore_rng",
    "storage_failure",
    "verify",
]
