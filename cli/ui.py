"""`vlctl ui`: the job dashboard (controller/dashboard) over the store named by VLCTL_DATABASE_URL; and the
`--ui` of `vlctl controller` and `vlctl run`, which serve it beside the reconcile loop.

Decisions:

- 127.0.0.1 by default. Binding anywhere else needs a token (`--token`, else VLCTL_UI_TOKEN): the page shows
  every job's names, messages and run folders, which a shared network should not see without one. A token set
  on loopback is enforced too.
- The printed URL does not carry the token (terminals are logged and shared); the first visit adds
  `?token=...`, after which a cookie carries it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from . import process
from .errors import EXIT_USER_ERROR, CliError
from .output import stderr

if TYPE_CHECKING:
    from controller.dashboard import DashboardServer
    from controller.store.session import Store

ENV_TOKEN = "VLCTL_UI_TOKEN"  # controller.dashboard.app.ENV_TOKEN: not imported at `vlctl --help`

UiOption = Annotated[
    bool, typer.Option("--ui", help="serve the job dashboard beside the loop (see `vlctl ui`)")
]
UiHostOption = Annotated[
    str, typer.Option("--ui-host", help="the dashboard's address (beyond loopback: --ui-token)")
]
UiPortOption = Annotated[int, typer.Option("--ui-port", help="the dashboard's port; 0: a free one")]
UiTokenOption = Annotated[
    str | None,
    typer.Option(
        "--ui-token",
        help="require this token on every dashboard request (default: $VLCTL_UI_TOKEN)",
        show_default=False,
    ),
]
HostOption = Annotated[
    str, typer.Option("--host", help="address to listen on (beyond loopback a token is required)")
]
PortOption = Annotated[int, typer.Option("--port", help="port to listen on; 0: a free one")]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token", help=f"require this token on every request (default: ${ENV_TOKEN})", show_default=False
    ),
]


def dashboard(db: Store, host: str, port: int, token: str | None) -> DashboardServer:
    """A dashboard server for `db`, bound and checked (not yet serving)."""
    from controller.dashboard import DashboardConfig, DashboardServer, is_loopback

    token = token if token is not None else os.environ.get(ENV_TOKEN) or None
    if token is not None and len(token) < 16:
        raise CliError("--token: use at least 16 characters (e.g. `openssl rand -hex 16`)", EXIT_USER_ERROR)
    if token is None and not is_loopback(host):
        raise CliError(
            f"--host {host}: serving beyond loopback needs --token (or ${ENV_TOKEN}); every request without it "
            "gets 401",
            EXIT_USER_ERROR,
        )
    try:
        return DashboardServer(db, host=host, port=port, config=DashboardConfig(token=token))
    except OSError as err:
        raise CliError(str(err), EXIT_USER_ERROR) from None


def announce(server: DashboardServer, token_required: bool) -> None:
    """The dashboard's URL on stderr (without the token)."""
    hint = " (first visit: add ?token=<your token>)" if token_required else ""
    stderr.print(f"dashboard on {server.url}{hint}", highlight=False, markup=False)


def ui(host: HostOption = "127.0.0.1", port: PortOption = 8470, token: TokenOption = None) -> None:
    """Serve the job dashboard: jobs, a job's loss curve, ranks heatmap, timeline, goodput and checkpoints,
    live. Read-only. Ctrl-C stops it."""
    process.long_running()
    from .store import store

    with store() as db:
        server = dashboard(db, host, port, token)
        announce(server, server.token_required)
        server.run()


def register(app: typer.Typer) -> None:
    app.command()(ui)
