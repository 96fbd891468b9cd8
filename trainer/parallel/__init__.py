"""Parallel training runtime: the dp x pp x tp mesh, tensor and pipeline parallelism, ZeRO-1 through DeepSpeed,
and the engine the training loop drives (see docs/parallelism.md)."""

from .config import TRAINING_STAGES, EngineConfig, OptimizerConfig, is_trainable, micro_batches_per_step
from .engine import ParallelEngine, StepResult, build_engine
from .mesh import Coords, Mesh, ParallelDims, destroy_distributed, init_distributed
from .tensor import ParamLayout
from .zero import Fragment

__all__ = [
    "TRAINING_STAGES",
    "Coords",
    "EngineConfig",
    "Fragment",
    "Mesh",
    "OptimizerConfig",
    "ParallelDims",
    "ParallelEngine",
    "ParamLayout",
    "StepResult",
    "build_engine",
    "destroy_distributed",
    "init_distributed",
    "is_trainable",
    "micro_batches_per_step",
]
