"""Suite-wide markers.

`timing`: a test whose outcome depends on how fast processes run (real processes and clocks, deadlines, rates,
detection within N windows). Each must hold on a machine whose cores other processes keep busy: it asserts
behaviour with margins, never wall-clock speed. `make test-load` runs exactly these next to two CPU hogs, several
times in a row. Every test marked slow or multiproc is one; the modules below hold the others.
"""

from __future__ import annotations

import os

import pytest

# In-place recovery of real ranks with the test as the controller, on dp=2 x pp=2 (six processes on two cores):
# issue 13's acceptance run, `make test-inplace-seeds`. Not in `make test`, which must stay under 15 minutes
# here: the fault matrix's in-place run covers the path under a real controller (dp=2).
collect_ignore = (
    [] if os.environ.get("VLCTL_INPLACE_TOPOLOGIES") else ["trainer/recovery/test_inplace_run.py"]
)

TIMING_MODULES = frozenset(
    {
        "tests/cli/test_cli_cluster.py",  # the operator's stand-in API server and watches
        "tests/cli/test_cli_run_elsewhere.py",
        "tests/controller/test_claims.py",  # leases and competing controller processes
        "tests/controller/test_ingest.py",  # tails and scrapes of live ranks, Prometheus
        "tests/controller/test_local_backend.py",  # process trees, signals, exit records
        "tests/controller/test_rank_memory.py",
        "tests/k8s/test_monitoring.py",  # a real Prometheus scraping
        "tests/k8s/test_operator.py",
        "tests/k8s/test_in_place_pods.py",  # pods run by a stand-in kubelet, a rank killed in one
        "tests/trainer/data/test_storage.py",  # S3 retries, rate caps and stalls
        "tests/trainer/data/test_video_cache.py",  # a writer killed mid-write
        "tests/trainer/test_checkpoint_outage.py",
        "tests/trainer/test_faults.py",
        "tests/trainer/test_telemetry.py",
    }
)


# The files with the longest runs, longest first. `make test` runs two files at a time (pytest-xdist, whole files
# per worker, in collection order): started first, they overlap with the rest instead of running last and alone
# (measured: 16 minutes with them in place, the fault matrix alone for the last six).
HEAVY_MODULES = (
    "tests/controller/test_fault_matrix.py",
    "tests/trainer/test_train.py",
    "tests/controller/test_live_supervision.py",
    "tests/trainer/recovery/test_inplace_run.py",  # with VLCTL_INPLACE_TOPOLOGIES (make test-inplace-seeds)
    "tests/controller/test_storage_outage.py",
    "tests/k8s/test_in_place_pods.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = config.rootpath

    def heavy_first(item: pytest.Item) -> int:
        module = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        return HEAVY_MODULES.index(module) if module in HEAVY_MODULES else len(HEAVY_MODULES)

    items.sort(key=heavy_first)  # stable: each file's tests keep their order
    for item in items:
        module = item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else ""
        if (
            module in TIMING_MODULES
            or item.get_closest_marker("slow")
            or item.get_closest_marker("multiproc")
        ):
            item.add_marker(pytest.mark.timing)
