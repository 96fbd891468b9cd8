"""What the reconcile loop needs from a backend: launch a gang of nodes, watch it, stop it, find it again.

A gang is one attempt of one job: every node's processes, started together and stopped together. The loop
keeps a gang's `record()` in the store, so a restarted controller can `attach` to it instead of launching anew.
Exit codes follow `subprocess`: 0 success, N > 0 the node's exit status, -N killed by signal N, and
`EXIT_LOST` when the node is gone and nobody can tell how it ended (not our child, no exit record).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

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
    ) -> GangHandle: ...

    def attach(self, record: Mapping[str, Any]) -> GangHandle: ...
