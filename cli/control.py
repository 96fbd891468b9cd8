"""`vlctl controller` (the reconcile daemon) and `vlctl run FILE` (submit, then supervise in the foreground).

Decisions:

- Both run the same `controller.reconciler.Controller` in this process, against the store named by
  VLCTL_DATABASE_URL; `run` is a controller that also shows one job live and returns when that job ends.
- Stop signals (SIGTERM, Ctrl-C, SIGHUP; see signals.py) end the current pass and then the command, the same
  way whichever arrives; a signal the caller ignores stays ignored.
- `controller` on a stop signal releases its claims and, by default, stops its jobs' ranks (they save a
  checkpoint first), so no process outlives it; the next controller resumes them uncounted. `--on-exit detach`
  leaves them training instead, for a controller upgrade: the next controller re-attaches. SIGKILL leaves them
  training too (nothing can run at SIGKILL); the next controller re-attaches. `run` on a stop signal cancels
  its job instead, like stopping any foreground program: the job ends `cancelled` (no later controller resumes
  it) and the ranks are stopped before it returns.
- Exit codes of `run`: 0 when the job succeeded, 1 when it failed or was cancelled by someone else, 128 + N when
  signal N stopped it (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from controller.domain.phases import TERMINAL_PHASES, Phase

from . import process
from .errors import EXIT_FAILURE, EXIT_USER_ERROR, CliError
from .live import job_snapshot, render_snapshot
from .options import OutputOption
from .output import OutputFormat, emit, stderr
from .signals import StopRequest, stop_on_signals
from .ui import UiHostOption, UiOption, UiPortOption, UiTokenOption

if TYPE_CHECKING:
    from controller.reconciler import Controller

EXIT_INTERRUPTED = 130  # Ctrl-C


def _controller(
    db,
    *,
    poll_seconds: float,
    controller_id: str | None,
    runs_root: Path | None,
    trainer_module: str = "trainer.train",
    env: dict[str, str] | None = None,
    lease_seconds: float | None = None,
) -> Controller:
    from controller.backends.local import LocalBackend, LocalBackendConfig
    from controller.reconciler import Controller, ControllerConfig

    try:
        config = ControllerConfig(
            poll_seconds=poll_seconds, **({} if lease_seconds is None else {"lease_seconds": lease_seconds})
        )
    except ValueError as err:
        raise CliError(f"--{str(err).replace('_', '-')}", EXIT_USER_ERROR) from None
    if controller_id:
        config.controller_id = controller_id
    if runs_root is not None:
        # Taken against the caller's directory now: the store keeps each job's run folder, which `vlctl logs`
        # and the next controller read from wherever they run.
        config.runs_root = runs_root.absolute()
    try:
        local = LocalBackend(LocalBackendConfig(module=trainer_module))
    except ValueError as err:
        raise CliError(f"--trainer-module: {err}", EXIT_USER_ERROR) from None
    return Controller(db, backends={"local": local}, config=config, env=env)


def controller(
    poll_seconds: Annotated[float, typer.Option(help="seconds between reconcile passes")] = 1.0,
    controller_id: Annotated[
        str | None, typer.Option("--id", help="this controller's id (default: per host)")
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(help="serve the controller's Prometheus metrics here; 0: off")
    ] = 9400,
    metrics_host: Annotated[str, typer.Option(help="address for the metrics endpoint")] = "127.0.0.1",
    runs_root: Annotated[
        Path | None, typer.Option(help="run folders of jobs with a relative run_dir")
    ] = None,
    trainer_module: Annotated[
        str, typer.Option(help="what each rank runs with the attempt's config (local backend)")
    ] = "trainer.train",
    on_exit: Annotated[
        str,
        typer.Option(
            help="stop: SIGTERM the jobs' ranks on exit (they save a checkpoint; the next controller resumes "
            "them); detach: leave them training, the next controller re-attaches"
        ),
    ] = "stop",
    lease_seconds: Annotated[
        float,
        typer.Option(
            help="how long this controller's claim on a job outlives its last renewal (each pass renews it): "
            "another controller takes the job over once it expires"
        ),
    ] = 30.0,
    with_ui: UiOption = False,
    ui_host: UiHostOption = "127.0.0.1",
    ui_port: UiPortOption = 8470,
    ui_token: UiTokenOption = None,
) -> None:
    """Run the reconcile loop: launch pending jobs, supervise running ones, restart failed ones."""
    if on_exit not in ("stop", "detach"):
        raise CliError(f"--on-exit: expected stop or detach, got {on_exit!r}", EXIT_USER_ERROR)
    process.long_running()
    from .store import store

    stop = threading.Event()
    with stop_on_signals(stop), store() as db, _dashboard(db, with_ui, ui_host, ui_port, ui_token):
        ctl = _controller(
            db,
            poll_seconds=poll_seconds,
            controller_id=controller_id,
            runs_root=runs_root,
            trainer_module=trainer_module,
            lease_seconds=lease_seconds,
        )
        server = _serve_metrics(db, metrics_host, metrics_port)
        stderr.print(
            f"controller {ctl.id} reconciling every {poll_seconds:g} s"
            + (f"; metrics on http://{metrics_host}:{metrics_port}/metrics" if server else ""),
            highlight=False,
        )
        try:
            ctl.run(stop)
        finally:
            ctl.shutdown(stop_jobs=on_exit == "stop")
            if server is not None:
                server.shutdown()
    if on_exit == "stop":
        stderr.print(
            "controller stopped; its jobs saved a checkpoint and resume with the next one", highlight=False
        )
    else:
        stderr.print(
            "controller stopped; its jobs keep training and the next one re-attaches", highlight=False
        )


@contextlib.contextmanager
def _dashboard(db, enabled: bool, host: str, port: int, token: str | None) -> Iterator[None]:
    """The dashboard in a thread beside the loop while it runs (`--ui`)."""
    if not enabled:
        yield
        return
    from .ui import announce, dashboard

    server = dashboard(db, host, port, token)
    server.start()
    announce(server, server.token_required)
    try:
        yield
    finally:
        server.stop()


def _serve_metrics(db, host: str, port: int):
    if not port:
        return None
    from controller.metrics import serve_metrics

    server, _thread = serve_metrics(db, host, port)
    return server


def run(
    file: Annotated[Path, typer.Argument(help="a TrainingJob spec (YAML or JSON)")],
    poll_seconds: Annotated[float, typer.Option(help="seconds between reconcile passes")] = 1.0,
    runs_root: Annotated[Path | None, typer.Option(help="run folder root for a relative run_dir")] = None,
    output: OutputOption = OutputFormat.table,
    trainer_module: Annotated[
        str, typer.Option(help="what each rank runs with the attempt's config (local backend)", hidden=True)
    ] = "trainer.train",
    with_ui: UiOption = False,
    ui_host: UiHostOption = "127.0.0.1",
    ui_port: UiPortOption = 8470,
    ui_token: UiTokenOption = None,
) -> None:
    """Submit a job and supervise it in the foreground, with a live view of step, loss, tokens/s, ETA, restarts
    and stragglers. Ctrl-C (or SIGTERM) cancels the job."""
    process.long_running()
    from .store import store
    from .store_jobs import create, load_submitted_spec

    spec = load_submitted_spec(file)  # relative paths from this directory, inputs and memory checked
    with store() as db, _dashboard(db, with_ui, ui_host, ui_port, ui_token):
        with db.transaction() as session:
            create(spec, session)
        stopped = StopRequest()
        phase = supervise(
            db,
            spec.name,
            poll_seconds=poll_seconds,
            runs_root=runs_root,
            live=output is OutputFormat.table,
            trainer_module=trainer_module,
            stopped=stopped,
        )
        data = job_snapshot(db, spec.name).as_dict(ranks=False)
    emit(data, output, lambda d: f"{d['name']}: {d['phase']} ({d['reason']}) {d['message']}".rstrip())
    if stopped.signum is not None and phase is Phase.CANCELLED:
        raise typer.Exit(stopped.exit_code)
    if phase is not Phase.SUCCEEDED:
        raise typer.Exit(EXIT_FAILURE)


def supervise(
    db,
    name: str,
    *,
    poll_seconds: float = 1.0,
    runs_root: Path | None = None,
    live: bool = True,
    controller_id: str | None = None,
    on_pass=None,
    env: dict[str, str] | None = None,
    progress=None,
    trainer_module: str = "trainer.train",
    stopped: StopRequest | None = None,
) -> Phase:
    """Run a controller until job `name` ends, showing it live (or calling `progress` with each snapshot when not
    live); a stop signal (Ctrl-C, SIGTERM, SIGHUP) cancels the job and is recorded in `stopped`. `on_pass` sees
    every snapshot too. Returns the job's phase."""
    from rich.live import Live

    from controller import states
    from controller.reconciler import default_controller_id
    from controller.store.repo import get_job

    ctl = _controller(
        db,
        poll_seconds=poll_seconds,
        controller_id=controller_id or f"{default_controller_id()}-run",
        runs_root=runs_root,
        trainer_module=trainer_module,
        env=env,
    )
    stop = threading.Event()
    phase: list[Phase] = [Phase.PENDING]
    view = (
        Live(render_snapshot(job_snapshot(db, name)), console=stderr, refresh_per_second=2) if live else None
    )

    def after_pass() -> None:
        snapshot = job_snapshot(db, name)
        assert snapshot.phase is not None
        phase[0] = snapshot.phase
        if view is not None:
            view.update(render_snapshot(snapshot))
        if on_pass is not None:
            on_pass(snapshot)
        if progress is not None:
            progress(snapshot)
        if phase[0] in TERMINAL_PHASES:
            stop.set()

    def cancel(why: str) -> None:
        with contextlib.suppress(OSError):  # SIGHUP: the terminal is gone; the cancel must still happen
            stderr.print(f"{why}: cancelling {name}", highlight=False)
        with db.transaction() as session:
            job = get_job(session=session, name=name)
            if job.phase not in TERMINAL_PHASES:
                states.cancel(job, session=session, message=f"{why} in `vlctl run`")
        # The job is cancelled in the store before its ranks go: no controller can take it for a restart.
        ctl.shutdown(stop_jobs=True)
        phase[0] = Phase.CANCELLED

    with stop_on_signals(stop) as request:
        try:
            if view is not None:
                view.start()
            ctl.run(stop, on_pass=after_pass)
            if request.signum is not None and phase[0] not in TERMINAL_PHASES:
                cancel(f"stopped by {request.name}")
            else:
                ctl.shutdown()
        finally:
            if view is not None:
                view.stop()
    if stopped is not None:
        stopped.signum = request.signum
    return phase[0]


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(controller)
