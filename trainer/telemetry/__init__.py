"""Per-rank step telemetry: phase timers, the Prometheus endpoint and other metric sinks, MFU.

The metric names, labels and files are the torch-free contract in `trainer.contract.telemetry`. Nothing here
imports torch at import time (`sync_point` and device detection import it when called), so the exporter and
the sinks also serve processes that never touch a GPU.

- timers: StepTimer (phases, collective waits, CUDA-synchronised clock reads), timed_collective, sync_point.
- sinks: the MetricSink interface, the per-rank JSONL file, the rank-0 log line and TensorBoard event files.
- prometheus: the per-rank HTTP endpoint on its own registry, and its sink.
- rank: TelemetryConfig and RankTelemetry, what the training loop holds.
- mfu: the FLOPs formula and the MFU estimate.
"""

from .mfu import PEAK_FLOPS, BatchShape, FlopsModel, MfuConfig, MfuMeter, mfu, parameter_counts
from .prometheus import PrometheusExporter, PrometheusSink
from .rank import RankTelemetry, TelemetryConfig, process_start_time
from .sinks import JsonlSink, LoggingSink, MetricSink, TensorBoardSink, read_jsonl
from .timers import StepTimer, StepTimes, sync_flags, sync_point, timed_collective

__all__ = [
    "PEAK_FLOPS",
    "BatchShape",
    "FlopsModel",
    "JsonlSink",
    "LoggingSink",
    "MetricSink",
    "MfuConfig",
    "MfuMeter",
    "PrometheusExporter",
    "PrometheusSink",
    "RankTelemetry",
    "StepTimer",
    "StepTimes",
    "TelemetryConfig",
    "TensorBoardSink",
    "mfu",
    "parameter_counts",
    "process_start_time",
    "read_jsonl",
    "sync_flags",
    "sync_point",
    "timed_collective",
]
