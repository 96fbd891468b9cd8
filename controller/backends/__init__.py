"""Where a job's processes run. `local`: this machine, a gang of torchrun agents (the embedded default)."""

from controller.backends.base import EXIT_LOST, Backend, GangHandle
from controller.backends.local import Gang, LocalBackend, LocalBackendConfig, log_dir, node_names
from controller.backends.stacks import dump_stacks

__all__ = [
    "EXIT_LOST",
    "Backend",
    "Gang",
    "GangHandle",
    "LocalBackend",
    "LocalBackendConfig",
    "dump_stacks",
    "log_dir",
    "node_names",
]
