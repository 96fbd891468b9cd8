"""Exceptions to one-line messages and exit codes. A traceback only with VLCTL_DEBUG=1."""

from __future__ import annotations

import os

from .output import stderr

EXIT_USER_ERROR = 2  # bad input: an invalid spec, an unknown name, a missing file
EXIT_FAILURE = 1  # the operation itself failed
EXIT_UNAVAILABLE = 3  # the store's database or the cluster's API server cannot be reached


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_for(err: BaseException) -> int:
    """Print the one-line message for `err` and return its exit code."""
    if os.environ.get("VLCTL_DEBUG") == "1":
        import traceback

        traceback.print_exception(err)
    if isinstance(err, CliError):
        stderr.print(f"error: {err}", markup=False, highlight=False)
        return err.exit_code
    if isinstance(err, (ValueError, FileNotFoundError)):
        stderr.print(f"error: {err}", markup=False, highlight=False)
        return EXIT_USER_ERROR
    stderr.print(
        f"error: {type(err).__name__}: {err} (VLCTL_DEBUG=1 shows the traceback)",
        markup=False,
        highlight=False,
    )
    return EXIT_FAILURE
