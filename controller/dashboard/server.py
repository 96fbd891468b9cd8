"""Serving the dashboard: uvicorn on a socket bound here (so port 0 gives a free port and the URL is known before
the first request), in the foreground (`vlctl ui`) or in a thread beside the reconcile loop."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from controller.store.session import Store

from .app import DashboardConfig, create_app


class DashboardServer:
    def __init__(
        self, store: Store, *, host: str = "127.0.0.1", port: int = 0, config: DashboardConfig | None = None
    ):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as err:
            self._socket.close()
            raise OSError(f"--host/--port: cannot listen on {host}:{port}: {err.strerror or err}") from None
        self._socket.listen(128)
        self.host = host
        self.port = self._socket.getsockname()[1]
        self.token_required = config is not None and config.token is not None
        app = create_app(store, config)
        self._server = uvicorn.Server(
            uvicorn.Config(
                app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def run(self) -> None:
        """Serve in this thread until `stop` (or SIGINT/SIGTERM, which uvicorn handles in the main thread)."""
        self._server.run(sockets=[self._socket])

    def start(self) -> DashboardServer:
        """Serve in a daemon thread; returns once it accepts connections."""
        # uvicorn installs signal handlers only in the main thread: the reconcile loop keeps the process's.
        self._thread = threading.Thread(target=self.run, name="dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise RuntimeError("the dashboard did not start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()
