"""The dashboard's web app: a read-only page per job list and job, and the JSON API behind them.

Routes (GET only; docs/ui.md documents them):

    /                              the jobs page
    /jobs/{name}                   a job's page
    /api/jobs[?phase=P]            controller.dashboard.data.jobs_document
    /api/jobs/{name}               job_document
    /api/jobs/{name}/steps?offset=N   steps_document (the loss curve, from a byte offset)
    /api/jobs/{name}/heatmap       heatmap_document
    /static/...                    the page's script and style, and plotly.js from the `plotly` package

Decisions:

- Starlette served by uvicorn: small, maintained, and the same app runs alone (`vlctl ui`) or in a thread beside
  the reconcile loop (`vlctl controller --ui`, `vlctl run --ui`). Handlers are plain functions (Starlette runs
  them in its thread pool): each opens one read session of the store, the way the CLI's commands do.
- Charts are plotly.js, shipped inside the `plotly` Python package and served from it: no CDN, so the page
  works offline and on an air-gapped cluster.
- Live: the page polls the JSON API every second (a job, and the loss curve's new bytes: a step's line reaches
  the page at the first poll after it is written). Polling keeps the server stateless and works through any
  proxy; server-sent events would save little at this rate.
- Security: with a token (`--token` or VLCTL_UI_TOKEN; required when bound beyond loopback), every request
  must carry it: `Authorization: Bearer <token>`, or the `vlctl_ui_token` cookie that a first visit with
  `?token=` sets (HttpOnly, SameSite=Strict). Anything else is 401. The page builds its DOM with textContent,
  never innerHTML, so a job's names, messages and logs show as text; a Content-Security-Policy allows scripts
  from this origin only, which stops an injected script even if one slipped through. Documents carry no store
  URL and no spec (where a secret could sit): only the read model's fields.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from controller.store.session import Store

from . import data

TOKEN_COOKIE = "vlctl_ui_token"
ENV_TOKEN = "VLCTL_UI_TOKEN"
STATIC = Path(__file__).with_name("static")
# Scripts and connections from this origin only; plotly sets inline styles on its SVG, hence 'unsafe-inline'
# for styles (styles cannot run code).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def plotly_js() -> Path:
    """plotly.min.js as the `plotly` package ships it."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    token: str | None = None  # None: no token asked (loopback only; cli/ui.py enforces that rule)
    refresh_seconds: float = 1.0  # how often the page polls


class _TokenGate:
    """401 for every request without the token (header, cookie, or a first `?token=` that sets the cookie)."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        offered = request.query_params.get("token")
        header = request.headers.get("authorization", "")
        candidates = [
            header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None,
            request.cookies.get(TOKEN_COOKIE),
            offered,
        ]
        if not any(
            c is not None and hmac.compare_digest(c.encode(), self.token.encode()) for c in candidates
        ):
            response: Response = PlainTextResponse("401: a token is required (see `vlctl ui --help`)", 401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="vlctl"'
            await response(scope, receive, send)
            return
        if offered is not None:  # a first visit with ?token=: the cookie carries it from now on

            async def send_with_cookie(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                    message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
                await send(message)

            await self.app(scope, receive, send_with_cookie)
            return
        await self.app(scope, receive, send)


class _SecurityHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The script, style and plotly.js are kept an hour (4.8 MB of plotly.js per page load otherwise);
        # pages and API answers never.
        static = scope.get("path", "").startswith("/static/")
        cache = b"private, max-age=3600" if static else b"no-store"

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", cache),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(store: Store, config: DashboardConfig | None = None) -> Starlette:
    config = config or DashboardConfig()

    def read(fn: Callable[..., Any], *args: Any) -> Response:
        try:
            with store.read() as session:
                return JSONResponse(fn(session, *args))
        except data.NotFound as err:
            return JSONResponse({"error": str(err)}, status_code=404)
        except ValueError as err:  # a bad parameter (an unknown phase)
            return JSONResponse({"error": str(err)}, status_code=400)

    def api_jobs(request: Request) -> Response:
        return read(data.jobs_document, request.query_params.get("phase") or None)

    def api_job(request: Request) -> Response:
        return read(data.job_document, request.path_params["name"])

    def api_steps(request: Request) -> Response:
        try:
            offset = int(request.query_params.get("offset", "0"))
        except ValueError:
            return JSONResponse(
                {"error": "offset: expected a byte offset (an integer >= 0)"}, status_code=400
            )
        if offset < 0:
            return JSONResponse(
                {"error": "offset: expected a byte offset (an integer >= 0)"}, status_code=400
            )
        return read(data.steps_document, request.path_params["name"], offset)

    def api_heatmap(request: Request) -> Response:
        return read(data.heatmap_document, request.path_params["name"])

    def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    def settings(request: Request) -> Response:
        return JSONResponse({"refresh_seconds": config.refresh_seconds})

    def plotly(request: Request) -> Response:
        return FileResponse(plotly_js(), media_type="text/javascript")

    routes = [
        Route("/", page),
        Route("/jobs/{name}", page),
        Route("/api/settings", settings),
        Route("/api/jobs", api_jobs),
        Route("/api/jobs/{name}", api_job),
        Route("/api/jobs/{name}/steps", api_steps),
        Route("/api/jobs/{name}/heatmap", api_heatmap),
        Route("/static/plotly.min.js", plotly),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_SecurityHeaders), Middleware(_TokenGate, token=config.token)],
    )


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    with suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False
