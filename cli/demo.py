"""`vlctl demo`: runs the trainer's model demo in a child process, streaming its output."""

from __future__ import annotations

import subprocess
import sys

from .errors import EXIT_FAILURE, CliError


def run_demo(out: str) -> None:
    code = subprocess.call([sys.executable, "-m", "trainer.model_demo", "--out", out])
    if code != 0:
        raise CliError(f"demo failed with exit code {code}; see the output above", EXIT_FAILURE)
