"""Metrics ingest: how the controller reads the ranks' step telemetry (see trainer.contract.telemetry).

Three sources behind one interface, `TelemetrySource.poll(now) -> TelemetryUpdate` (`state`):

- `JsonlTelemetry` (`jsonl`) tails each rank's `metrics-rank{N}.jsonl` in the run folder (local backend): every
  step.
- `EndpointTelemetry` (`endpoint`) scrapes each rank's HTTP endpoint, found through
  `metrics-rank{N}.endpoint.json`: the newest step per scrape, at most `max_scrapes_per_poll` ranks a poll.
- `PrometheusTelemetry` (`prometheus`) reads the same series from a Prometheus server's HTTP API (clusters, where
  Prometheus already scrapes the pods): the newest step per poll.

Decisions:

- Attempts. Every attempt appends to the same files, so JSONL lines and endpoint files carry the launcher's
  attempt number (absent: 0). A source reads one attempt; what belongs to any other is skipped.
  `start_attempt(k)` switches before attempt k is launched. Prometheus series carry no attempt: the process
  start time tells them apart.
- Checkpoint steps. The trainer stages a checkpoint between two steps and saves it in the background during the
  next, and logs the stage under that next step's index; so the step whose index equals a stage or save line's
  step is marked `is_checkpoint_step`, whichever line comes first. A scrape sees a checkpoint as a changed
  `checkpoint_seconds` gauge and marks the step it reports. Loads (before the first step) mark nothing.
- A scrape's step sample is the newest step only, emitted when the step advanced and the rank has timed a step
  (`step_seconds` set). The step gauge also moves on a checkpoint line, so a scrape can see the index of a step
  about to start; such a sample is a checkpoint step and the straggler detector skips it.
- Token rates, per rank. JSONL: the last step's tokens over its wall time. Scrapes: the counters' increase over
  the steps advanced, per step, over the last step's wall time. Ranks of one data-parallel replica (tp x pp)
  count the same tokens; the job's rate is `controller.supervision`'s.
- Scale (16,384 ranks). A source keeps its ranks' states in columns (`columns.RankColumns`, a numpy array per
  field) and, for JSONL, a cursor per rank; nothing grows with the steps. A poll's samples come as a StepBatch
  (columns too) and its ranks as `RankStates`, a mapping that builds a rank's `RankState` when asked. Each
  module says what one poll costs.
"""

from .columns import RankColumns, RankState, RankStates
from .endpoint import EndpointTelemetry
from .jsonl import JsonlTelemetry
from .prometheus import PrometheusTelemetry
from .state import CheckpointOp, TelemetrySource, TelemetryUpdate

__all__ = [
    "CheckpointOp",
    "EndpointTelemetry",
    "JsonlTelemetry",
    "PrometheusTelemetry",
    "RankColumns",
    "RankState",
    "RankStates",
    "TelemetrySource",
    "TelemetryUpdate",
]
