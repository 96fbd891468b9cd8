"""`vlctl`: train Qwen2-VL models and supervise the runs."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from . import control, inspect, jobs, model, operator, process, render, simulate, ui
from .errors import exit_code_for


class _Root(TyperGroup):
    """Turns any error from a command into its one-line message and exit code (see errors.py), so the console
    script and CliRunner behave the same."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as err:  # noqa: BLE001 - the one place errors become exit codes
            # Usage errors and exits belong to typer/click (typer >= 0.29 vendors its own click).
            if isinstance(err, (typer.Exit, typer.Abort)) or type(err).__module__.startswith(
                ("typer", "click")
            ):
                raise
            if isinstance(err, BrokenPipeError):  # the reader of our output left: not an error
                _silence_stdout()
                raise typer.Exit(0) from None
            raise typer.Exit(exit_code_for(err)) from None


app = typer.Typer(cls=_Root, help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(model.app, name="model")
jobs.register(app)
inspect.register(app)
control.register(app)
render.register(app)
operator.register(app)
simulate.register(app)
ui.register(app)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # only for --version: a slow import

    try:
        return version("vlctl")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def _print_version(value: bool) -> None:
    if value:
        try:
            print(f"vlctl {_version()}", flush=True)
        except BrokenPipeError:  # before any command runs, so outside _Root's rule
            _silence_stdout()
        raise typer.Exit()


@app.callback()
def root(
    version_: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """Train Qwen2-VL models and supervise the runs."""


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="folder for the demo's data, run, logs and store")] = "runs/demo",
) -> None:
    """The main demo: train the mini Qwen2-VL as a 2-node job under the controller, kill a rank and watch it
    resume from the newest checkpoint, slow a rank and watch it flagged, then a summary (a few minutes)."""
    process.long_running()
    from .demo import run_demo

    run_demo(out)


def main() -> None:
    process.fast_start()
    code: int | str | None = 0
    try:
        try:
            app()
        except SystemExit as done:
            code = done.code
        finally:
            # Flushed here, not at interpreter exit: a reader that left is seen inside the handler below.
            sys.stdout.flush()
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        _silence_stdout()
        code = 0
    process.finish(code)


def _silence_stdout() -> None:
    """`vlctl ... | head`: the reader has what it wanted and left. Stop quietly with status 0 (click would
    say 1; a pipeline under `set -o pipefail` should not fail because its reader stopped early). What is still
    buffered goes to /dev/null, so the interpreter's final flush does not fail again."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
