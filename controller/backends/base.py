"""What the reconcile loop needs from a backend: launch a gang of nodes, watch it, stop it, find it again.

A gang is one attempt of one job: every node's processes, started together and stopped together. The loop
keeps a gang's `record()` in the store, so a restarted controller can `attach` to it instead of launching anew.
Exit codes follow `subprocess`: 0 success, N > 0 the node's exit status, -N killed by signal N, and
`EXIT_LOST` when the node is gone and nobody can tell how it ended (not our child, no exit record).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from controller.backends.torchrun_log import WorkerExit
from controller.ingest import TelemetrySource

EXIT_LOST = 256  # outside 0..255 and the negative signal range: no status could be read


class GangHandle(Protocol):
    job_name: str
    attempt: int

    def poll(self) -> dict[str, int | None]:
        """Each node's exit code, None while it runs."""
        ...

    def pids(self) -> dict[str, list[int]]:
        """Each node's live processes, its agent first."""
        ...

    def worker_exits(self) -> list[WorkerExit]:
        """The failed ranks' own exit codes (root causes first), as far as the backend can tell."""
        ...

    def dump_stacks(self) -> dict[int, str]:
        """Each live rank's Python stacks, also written into the job's logs (hang diagnosis)."""
        ...

    def rank_pids(self) -> dict[int, int]:
        """Global rank -> pid of the training process, for the ranks alive now."""
        ...

    def cancel(self, grace_seconds: float) -> None:
        """SIGTERM to every process of the gang, SIGKILL to what is left after the grace period."""
        ...

    def detach(self) -> None:
        """Leave the gang running when this controller exits."""
        ...

    def record(self) -> dict[str, Any]:
        """JSON-serializable: what `Backend.attach` needs to find the gang again."""
        ...


class Backend(Protocol):
    def launch(
        self,
        *,
        job_name: str,
        attempt: int,
        config_path: str | Path,
        overrides: Sequence[str],
        nodes: int,
        procs_per_node: int,
        run_dir: str | Path,
        env: Mapping[str, str] | None = None,
        names: Sequence[str] | None = None,
        excluded: Collection[str] = (),
        hot_spares: int | None = None,
    ) -> GangHandle:
        """Start attempt `attempt`: every rank runs `python -m trainer.train config_path *overrides`. `excluded`:
        machines the gang must avoid (a backend whose node names are machines already left them out).
        `hot_spares`: in-place recovery with this many spare nodes (None: the restart path)."""
        ...

    def attach(self, record: Mapping[str, Any]) -> GangHandle: ...

    def reap(self, job_name: str, *, keep: Sequence[str] = ()) -> int:
        """Stop processes of `job_name` that no recorded gang owns (a launch its controller died in)."""
        ...

    def node_slots(self, *, nodes: int, spares: int, excluded: Collection[str]) -> list[str] | None:
        """Names of the `nodes` nodes the next attempt runs on, avoiding `excluded`; None when too few are left.
        (Local: local-0, local-1, ... with spares after them. Kubernetes: slots n0, n1, ... whose pods the
        scheduler places, kept off excluded machines by node affinity, so every slot is always usable.)"""
        ...

    def telemetry(
        self,
        *,
        job_name: str,
        run_dir: Path,
        num_ranks: int,
        attempt: int,
        rank_nodes: Sequence[str],
        reattach: bool,
    ) -> TelemetrySource:
        """Where the controller reads the attempt's per-rank step telemetry."""
        ...
