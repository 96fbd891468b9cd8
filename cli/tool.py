"""Run the trainer's torch-side tools in a child process: the CLI never imports torch itself."""

from __future__ import annotations

import json
import subprocess
import sys

from trainer.contract import EXIT_USER_ERROR, MODEL_TOOL_MODULE

from .errors import EXIT_FAILURE, CliError


def run_model_tool(*args: str) -> dict:
    """`python -m trainer.model_tool ARGS` with this interpreter; its JSON result, or its one-line error."""
    proc = subprocess.run(
        [sys.executable, "-m", MODEL_TOOL_MODULE, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        message = lines[-1].removeprefix("error: ") if lines else f"model tool exited with {proc.returncode}"
        raise CliError(message, EXIT_USER_ERROR if proc.returncode == EXIT_USER_ERROR else EXIT_FAILURE)
    return json.loads(proc.stdout)
