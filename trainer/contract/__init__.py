"""The torch-free contract between the trainer and the control plane (controller, k8s, cli).

Nothing in this package imports torch: the controller, the operator and the CLI import it alone from `trainer`
(enforced by import-linter, see .importlinter). Work that needs torch runs in a child process started with
`python -m <module>` and talks back in JSON or through the files and metrics described here.

- model_tool: the `python -m trainer.model_tool` protocol behind `vlctl model ...`.
- training: the training configuration schema (pydantic) shared by the trainer, controller and CLI.
- telemetry: the per-rank metrics every training process exports, and their parser.
- memory: the per-rank memory estimate the control plane checks a job against at submit.
"""

from .model_tool import (
    EXIT_USER_ERROR,
    MODEL_PRESETS,
    MODEL_TOOL_MODULE,
    GenerateResult,
    MemoryEstimate,
    ModelInfo,
)

__all__ = [
    "EXIT_USER_ERROR",
    "MODEL_PRESETS",
    "MODEL_TOOL_MODULE",
    "GenerateResult",
    "MemoryEstimate",
    "ModelInfo",
]
